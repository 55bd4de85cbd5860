"""C = E[k kᵀ]: the uncentred second moment of the rewrite module's input.

ROME uses C⁻¹k to pick the key direction least used by other text; MEMIT and
AlphaEdit use the same matrix. All requested layers are collected in one pass
that stops after the deepest one, and results are cached on disk (safetensors,
written atomically, validated on load), keyed by everything they depend on, the
full-content fingerprint of the weights included. Each cache file carries a SHA-256 of
its matrix and metadata (:mod:`factedit.integrity`); a file that does not match it is
refused, naming the file (delete it to recompute).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.hooks import TraceDict
from factedit.integrity import load_signed, save_signed
from factedit.models.architectures import arch_for, check_layer
from factedit.models.fingerprint import model_fingerprint
from factedit.models.tokens import document_start_of
from factedit.paths import atomic_write_bytes, cache_dir
from factedit.progress import Progress, as_progress
from factedit.stats.corpus import TextCorpus, open_corpus
from factedit.text import pad_id, pad_right

log = logging.getLogger(__name__)
FORMAT = "factedit-mom2-v2"  # v1 plus the content checksum
_REMEDY = "delete it to recompute"
ACC_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class StatsKey:
    """Everything a second moment depends on; its hash names the cache file."""

    model_fingerprint: str
    module: str
    corpus_id: str
    n_tokens: int
    max_length: int
    dtype: str
    shuffle_seed: int | None
    document_start: str = ""  # the token the tokenizer prepends (models/tokens.py): it changes every sequence

    def filename(self) -> str:
        fields = asdict(self)
        if not fields["document_start"]:  # files from before the field keep their names
            del fields["document_start"]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
        return f"{self.module}-{digest}.safetensors"


def stats_path(key: StatsKey, folder: Path | None = None) -> Path:
    return (folder or cache_dir("stats")) / key.filename()


def save_second_moment(path: Path, moment: torch.Tensor, key: StatsKey, count: int) -> None:
    meta = {k: str(v) for k, v in asdict(key).items()} | {"count": str(count), "format": FORMAT}
    atomic_write_bytes(path, save_signed({"mom2": moment}, meta))


def load_second_moment(path: str | Path, key: StatsKey | None = None, dim: int | None = None) -> torch.Tensor:
    """Read a cached (or user-supplied) second moment, refusing corrupt or mismatched files.

    A file with a checksum must match it; a cache file (``key`` given) must have one. A user-supplied
    file (no ``key``) may come from elsewhere: without a checksum it is used unverified, and may hold
    the matrix under ``mom2`` or as its only tensor.
    """
    path = Path(path)
    tensors, meta, _ = load_signed(path, f"statistics file {path}", required=key is not None, remedy=_REMEDY)
    moment = tensors.get("mom2", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if moment is None:
        raise FactEditError(f"statistics file {path} holds no 'mom2' tensor")
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1] or (dim is not None and moment.shape[0] != dim):
        raise FactEditError(f"statistics file {path} has shape {tuple(moment.shape)}, expected a ({dim}, {dim}) matrix")
    if not torch.isfinite(moment).all():
        raise FactEditError(f"statistics file {path} contains non-finite values; delete it to recompute")
    if key is not None:
        expected = {k: str(v) for k, v in asdict(key).items()}
        stored = {k: meta.get(k) for k in expected}
        if stored != expected:
            raise FactEditError(f"statistics file {path} was computed for other settings: {stored} != {expected}")
    return moment


def collect_second_moments(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    layers: Iterable[int],
    corpus: TextCorpus,
    *,
    n_tokens: int,
    max_length: int = 1024,
    dtype: str = "float32",
    batch_tokens: int = 8192,
    shuffle_seed: int | None = None,
    progress: Progress | bool | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over ``corpus``: the rewrite-module inputs of every layer, stopped after the deepest.

    Returns ``({layer: E[kkᵀ]}, tokens_seen)``; exactly ``n_tokens`` tokens (or all the corpus has).
    """
    arch = arch_for(model)
    layers = sorted({check_layer(model, layer) for layer in layers})
    names = [arch.rewrite_at(layer) for layer in layers]
    acc_dtype = ACC_DTYPES[dtype]
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    pid = pad_id(tok)
    bar = as_progress(progress).stage(
        f"second moments of layer(s) {','.join(map(str, layers))} on {corpus.name} (computed once, then cached)",
        total=n_tokens,
        unit="tok",
    )

    def run_batch(batch: list[list[int]]) -> None:
        nonlocal seen
        ids, mask = pad_right(batch, pid, device)
        with torch.no_grad(), TraceDict(model, names, retain_input=True, retain_output=False, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask.bool()
        take = min(int(keep.sum()), n_tokens - seen)
        for layer, name in zip(layers, names):
            k = tr[name].input[keep][:take].to(acc_dtype)
            sums[layer] = sums.get(layer, 0) + k.T @ k
        seen += take
        bar.advance(take)

    def batches(pool: list[list[int]]):
        """Length-sorted batches of at most ``batch_tokens`` padded tokens (little padding waste)."""
        batch: list[list[int]] = []
        for ids in sorted(pool, key=len):
            if batch and len(ids) * (len(batch) + 1) > batch_tokens:
                yield batch
                batch = []
            batch.append(ids)
        if batch:
            yield batch

    pool: list[list[int]] = []
    pool_tokens = 0
    docs = corpus.iter_documents(shuffle_seed)
    while seen < n_tokens:
        doc = next(docs, None)
        if doc is not None:
            ids = tok(doc, truncation=True, max_length=max_length)["input_ids"]
            if ids:
                pool.append(ids)
                pool_tokens += len(ids)
        # Sort and run a pool once it holds enough text for the remaining sample (or the corpus ends).
        if pool and (doc is None or pool_tokens >= min(n_tokens - seen, 16 * batch_tokens)):
            for batch in batches(pool):
                if seen >= n_tokens:
                    break
                run_batch(batch)
            pool, pool_tokens = [], 0
        if doc is None:
            break
    bar.close()
    if seen == 0:
        raise FactEditError(f"corpus {corpus.name} produced no tokens")
    if seen < n_tokens:
        log.warning("corpus %s has only %d tokens (asked for %d)", corpus.name, seen, n_tokens)
    return {
        layer: (s / seen).to(torch.float32 if dtype == "float32" else torch.float64) for layer, s in sums.items()
    }, seen


def second_moments(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    layers: Iterable[int],
    *,
    corpus: str | Path | TextCorpus | None = None,
    n_tokens: int = 100_000,
    max_length: int = 1024,
    dtype: str = "float32",
    shuffle_seed: int | None = None,
    cache: bool = True,
    cache_folder: Path | None = None,
    progress: Progress | bool | None = None,
) -> dict[int, torch.Tensor]:
    """Cached E[kkᵀ] for each layer's rewrite module; missing layers are computed together in one pass."""
    arch = arch_for(model)
    layers = sorted({check_layer(model, layer) for layer in layers})
    if dtype not in ACC_DTYPES:
        raise FactEditError(f"statistics dtype must be one of {', '.join(ACC_DTYPES)}")
    text = corpus if isinstance(corpus, TextCorpus) else open_corpus(corpus)
    fingerprint = model_fingerprint(model)
    keys = {
        layer: StatsKey(
            fingerprint,
            arch.rewrite_at(layer),
            text.corpus_id,
            n_tokens,
            max_length,
            dtype,
            shuffle_seed,
            document_start_of(tok),
        )
        for layer in layers
    }
    result: dict[int, torch.Tensor] = {}
    if cache:
        for layer, key in keys.items():
            path = stats_path(key, cache_folder)
            if path.is_file():
                result[layer] = load_second_moment(path, key)
    missing = [layer for layer in layers if layer not in result]
    if result:
        log.info("second moments for layer(s) %s read from the cache (corpus %s)", sorted(result), text.source)
    if missing:
        log.info(
            "computing second moments for layer(s) %s: %d tokens of %s (cached afterwards under %s)",
            missing,
            n_tokens,
            text.source,
            cache_folder or cache_dir("stats"),
        )
        started = time.perf_counter()
        computed, seen = collect_second_moments(
            model,
            tok,
            missing,
            text,
            n_tokens=n_tokens,
            max_length=max_length,
            dtype=dtype,
            shuffle_seed=shuffle_seed,
            progress=progress,
        )
        log.info("second moments for layers %s: %d tokens in %.1fs", missing, seen, time.perf_counter() - started)
        for layer, moment in computed.items():
            if cache:
                save_second_moment(stats_path(keys[layer], cache_folder), moment, keys[layer], seen)
            result[layer] = moment
    device = next(model.parameters()).device
    return {layer: result[layer].to(device) for layer in layers}
