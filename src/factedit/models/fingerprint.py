"""Content identity of a model's current weights: every byte of every weight, hashed fast.

Statistics caches, context templates and patches are keyed by :func:`model_fingerprint`, so it
must change whenever any weight changes: a fingerprint over a sample of each tensor let a one-element
change (``W[0, 1] += 1000``, which turned " Paris" 0.70 into " the" 0.06) pass as the unedited model,
and statistics computed on it were cached under the unedited model's name.

What is hashed: :func:`model_identity` (the config essentials), then for every entry of
``model.state_dict()`` (all parameters and persistent buffers; tied weights under each name, their
bytes once) its name, shape, dtype and the SHA-256 of its bytes (:func:`tensor_sha256`).

Cost, and why there is a per-tensor cache. Hashing SmolLM2-135M's 540 MB of float32 weights costs
about 0.35 s (SHA-256 with the CPU's SHA instructions; ``bench/fingerprint_cost.py``), and an edit
asks for the fingerprint several times. So each weight's digest is remembered, and reused only when
all of these agree with the time it was computed:

1. the same tensor object, storage pointer, shape, strides, dtype and device;
2. its version counter (``tensor._version``): every in-place write through the tensor or a view of
   it bumps it (``copy_``, ``add_``, ``param[0, 1] += 1000`` under ``no_grad``, optimiser steps);
3. a *content check* that reads every byte: the wrap-around sums of each 1 KiB block of 64-bit
   words, hashed (memory-bandwidth bound: about 35 ms for the whole default model, 10x less than
   SHA-256). Writes through ``param.data`` (measured: they do *not* bump ``param._version``), numpy
   views or C extensions are caught by this check: any change to one element changes its block's
   sum. Only a write that bypasses the version counter *and* keeps every block's sum (e.g. swapping
   two words inside one block through ``.data``) could go unseen; ``model_fingerprint(model,
   full=True)`` rehashes everything when even that must be excluded.

factedit's own writers (patch apply / revert, stack restore, restore of replaced weights) also call
:func:`forget_digests` on what they wrote, so their writes never depend on the checks above.
Tensors under 1 MiB are hashed every time (microseconds) and not cached.

:func:`cast_fingerprint` is the fingerprint a copy cast to another dtype would have, computed without
the copy: statistics of float32 weights are filed under it for their bfloat16 / float16 casts.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from factedit.errors import FactEditError
from factedit.integrity import tensor_bytes_sha256
from factedit.models.placement import is_offloaded, offloaded_value

_FORMAT = b"factedit-fingerprint-v2"
_SMALL_BYTES = 1 << 20
_BLOCK_WORDS = 128  # 1 KiB blocks of 64-bit words in the content check
_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class _Digest:
    ref: weakref.ref
    key: tuple
    check: bytes
    sha256: str


_lock = threading.Lock()
_digests: dict[int, _Digest] = {}


def _layout_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, str(t.device))


@torch.no_grad()
def content_check(tensor: torch.Tensor) -> bytes | None:
    """A cheap hash that reads every byte of ``tensor``: SHA-256 of its per-block wrap-around sums of
    64-bit words (plus the bytes that do not fill a word). ``None`` when there is no cheap way (non-contiguous)."""
    t = tensor.detach()
    if not t.is_contiguous() or t.device.type == "meta":
        return None
    flat = t.reshape(-1).view(torch.uint8)
    n = flat.numel()
    n_words = n // 8
    n_blocks = n_words // _BLOCK_WORDS
    h = hashlib.sha256()
    if flat.device.type == "cpu":
        raw = flat.numpy()
        words = raw[: n_words * 8].view(np.uint64)
        h.update(np.add.reduce(words[: n_blocks * _BLOCK_WORDS].reshape(n_blocks, _BLOCK_WORDS), axis=1).tobytes())
        h.update(words[n_blocks * _BLOCK_WORDS :].tobytes())
        h.update(raw[n_words * 8 :].tobytes())
        return h.digest()
    try:  # on an accelerator: reduce there, copy only the block sums
        words = flat[: n_words * 8].view(torch.int64)
    except RuntimeError:  # storage offset not a multiple of 8 bytes
        return None
    sums = words[: n_blocks * _BLOCK_WORDS].view(n_blocks, _BLOCK_WORDS).sum(1)
    h.update(sums.cpu().numpy().tobytes())
    h.update(words[n_blocks * _BLOCK_WORDS :].cpu().numpy().tobytes())
    h.update(flat[n_words * 8 :].cpu().numpy().tobytes())
    return h.digest()


def _drop(ref: weakref.ref, key: int) -> None:
    with _lock:
        entry = _digests.get(key)
        if entry is not None and entry.ref is ref:
            del _digests[key]


@torch.no_grad()
def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of one tensor's bytes (row-major), as :func:`factedit.integrity.tensor_bytes_sha256`;
    remembered per tensor and reused only while its layout, version and content check agree (module docstring)."""
    if tensor.numel() * tensor.element_size() < _SMALL_BYTES:
        return tensor_bytes_sha256(tensor)
    key = _layout_key(tensor)
    check = content_check(tensor)
    if check is None:
        return tensor_bytes_sha256(tensor)
    with _lock:
        entry = _digests.get(id(tensor))
    if entry is not None and entry.ref() is tensor and entry.key == key and entry.check == check:
        return entry.sha256
    digest = tensor_bytes_sha256(tensor)
    if _layout_key(tensor) == key:  # not written meanwhile (by another thread)
        ident = id(tensor)
        ref = weakref.ref(tensor, lambda r, k=ident: _drop(r, k))
        with _lock:
            _digests[ident] = _Digest(ref, key, check, digest)
    return digest


def forget_digests(*tensors: torch.Tensor) -> None:
    """Drop the remembered digests of ``tensors``: called by every factedit write to a weight."""
    with _lock:
        for t in tensors:
            _digests.pop(id(t), None)


def cached_digest_count() -> int:
    """How many tensor digests are remembered (for tests and the benchmark)."""
    with _lock:
        return len(_digests)


def model_identity(model: nn.Module) -> str:
    """Hash of the architecture alone (config essentials), to tell 'other model' from 'other weights'."""
    cfg = model.config.to_dict()
    essentials = {k: cfg.get(k) for k in _CONFIG_KEYS if k in cfg}
    return hashlib.sha256(json.dumps(essentials, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_of(model: nn.Module, entry: Callable[[torch.Tensor], tuple[torch.dtype, str]]) -> str:
    """The fingerprint with ``entry(tensor) -> (dtype, sha256)`` standing for each state tensor (tied ones once)."""
    h = hashlib.sha256(_FORMAT + b"|" + model_identity(model).encode())
    seen: dict[int, tuple[torch.dtype, str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        found = seen.get(id(t))
        if found is None:
            # an offloaded weight (a "meta" placeholder on the module) is hashed by the value accelerate holds,
            # so a model with layers on disk has the fingerprint of the same weights loaded whole
            held = offloaded_value(model, name) if is_offloaded(t) else None
            found = seen[id(t)] = entry(t if held is None else held)
        dtype, digest = found
        h.update(f"|{name}|{tuple(t.shape)}|{dtype}|{digest}".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def model_fingerprint(model: nn.Module, *, full: bool = False) -> str:
    """Hash of the identity and of every weight's name, shape, dtype and full content (module docstring).

    ``full=True`` ignores the remembered digests and hashes every byte again (and remembers the result).
    """
    if full:
        forget_digests(*(t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)))
    return _fingerprint_of(model, lambda t: (t.dtype, tensor_sha256(t)))


def _casts_to(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``model.to(dtype)`` converts this tensor: ``nn.Module.to`` casts floating and complex
    tensors only (integer and bool buffers keep their dtype)."""
    return tensor.dtype != dtype and (tensor.is_floating_point() or tensor.is_complex())


@torch.no_grad()
def cast_fingerprint(model: nn.Module, dtype: torch.dtype) -> str:
    """The :func:`model_fingerprint` that ``model.to(dtype)`` would have, without making that copy.

    Why: statistics computed on float32 weights are filed for the same weights cast to bfloat16 or
    float16 too (``stats/second_moment.py``), which needs the cast model's fingerprint while only the
    float32 model exists. Each floating tensor is cast on its own device (``Tensor.to``: round to
    nearest even, as ``nn.Module.to`` and ``from_pretrained(dtype=...)`` do), hashed and freed, so the
    extra memory is one tensor at ``dtype``; tensors the cast leaves alone reuse their remembered digest.
    Bit for bit ``model_fingerprint(model.to(dtype))`` (``tests/test_stats_sharing.py``).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FactEditError(f"cast_fingerprint needs a floating-point torch dtype, not {dtype!r}")

    def entry(t: torch.Tensor) -> tuple[torch.dtype, str]:
        if not _casts_to(t, dtype):
            return t.dtype, tensor_sha256(t)
        cast = t.detach().to(dtype)
        digest = tensor_bytes_sha256(cast)
        del cast  # freed before the next tensor is cast
        return dtype, digest

    return _fingerprint_of(model, entry)
