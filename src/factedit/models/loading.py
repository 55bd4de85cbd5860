"""Load a causal LM and its tokenizer from a registry name, a GGUF file, a folder or a hub id.

GGUF weights are dequantized by ``transformers`` (slow: tens of seconds), so the
first load writes a float32 safetensors copy under ``$FACTEDIT_HOME/models``;
later loads read that copy in about a second. Every cache write goes to a name of
its own (process id + random token) and is renamed into place, so processes that
convert the same model at once never see or delete each other's half-written files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.models.architectures import arch_for
from factedit.models.registry import (
    CACHE_MARKER,
    DEFAULT_MODEL,
    NAME_ATTRIBUTE,
    REGISTRY,
    ModelSource,
    gguf_parts,
)
from factedit.paths import cache_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPLETE = CACHE_MARKER
_PUBLISH_ATTEMPTS = 3


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise FactEditError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode, on ``device``, in ``dtype``.

    ``name_or_path``: a registry name (default ``smollm2-135m``), a ``.gguf`` file,
    a local model folder, or a Hugging Face hub id (needs network).
    """
    name = name_or_path or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    if name in REGISTRY:
        folder = _cached_from_gguf(REGISTRY[name])
        model, tok = _from_folder(folder, torch_dtype)
        setattr(model.config, NAME_ATTRIBUTE, name)  # registry_name(model): measured defaults, labels
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FactEditError(f"GGUF file not found: {path}")
        folder = _cached_gguf_file(path)
        model, tok = _from_folder(folder, torch_dtype)
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not path.is_dir():
            raise FactEditError(
                f"model path {name!r} does not exist; give a folder, a .gguf file, a hub id "
                f"or one of the registered names: {', '.join(REGISTRY)}"
            )
        try:
            model, tok = _from_folder(str(path) if path.is_dir() else name, torch_dtype)
        except OSError as exc:
            raise FactEditError(
                f"could not load model {name!r} ({exc.__class__.__name__}); registered names: {', '.join(REGISTRY)}"
            ) from exc
    arch_for(model)  # refuse unsupported families at load time, with the list of supported ones
    model.to(device)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    log.info("loaded %s in %.1fs", name, time.perf_counter() - started)
    return model, tok


def _from_folder(folder: str | Path, dtype: torch.dtype, gguf_file: str | None = None):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model, tok


def _private_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no other process (or thread) will pick."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _cached_from_gguf(source: ModelSource) -> Path:
    target = cache_dir("models") / source.name
    if (target / _COMPLETE).is_file():
        return target
    parts = gguf_parts(source)
    if len(parts) == 1:
        return _convert_gguf(parts[0].parent, parts[0].name, target, source=source.name)
    joined_dir = cache_dir("gguf") / source.name
    joined = joined_dir / source.gguf_name
    if not joined.is_file():  # only ever appears complete: it is renamed into place
        log.info("joining %d GGUF chunks of %s", len(parts), source.name)
        joined_dir.mkdir(parents=True, exist_ok=True)
        tmp = _private_name(joined)
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as chunk:
                        shutil.copyfileobj(chunk, out, length=16 << 20)
            os.replace(tmp, joined)
        finally:
            tmp.unlink(missing_ok=True)
    return _convert_gguf(joined_dir, joined.name, target, source=source.name)


def _cached_gguf_file(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir("models") / f"gguf-{path.stem}-{key}"
    if (target / _COMPLETE).is_file():
        return target
    return _convert_gguf(path.parent, path.name, target, source=str(path))


def _convert_gguf(folder: Path, gguf_file: str, target: Path, *, source: str) -> Path:
    """Dequantize a GGUF model once and store it as float32 safetensors."""
    log.info("dequantizing %s (first load only; later loads use %s)", gguf_file, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF quantizer marks the model as quantized, which blocks save_pretrained
    # and would make reloads look for the GGUF file again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _private_name(target)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"source": source, "gguf_file": gguf_file}))
        _publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish_folder(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place, atomically.

    If another process got there first with a complete copy, that copy stays and ours is dropped; an
    incomplete folder left by an older version or a crash is first renamed away (atomic too), then removed.
    """
    error: OSError | None = None
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            tmp.rename(target)
            return
        except OSError as exc:
            error = exc
            if (target / _COMPLETE).is_file():
                return  # someone else's complete copy; the caller removes ours
        stale = _private_name(target)
        try:
            target.rename(stale)
        except FileNotFoundError:
            continue  # gone meanwhile: try again
        except OSError as exc:
            raise FactEditError(f"cannot replace the incomplete cache folder {target}: {exc}") from exc
        shutil.rmtree(stale, ignore_errors=True)
    raise FactEditError(f"could not write the cache folder {target}: {error}")
