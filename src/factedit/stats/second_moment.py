"""C = E[k kᵀ]: the uncentred second moment of the rewrite module's input.

ROME uses C⁻¹k to pick the key direction least used by other text; MEMIT and
AlphaEdit use the same matrix. All requested layers are collected in one pass
that stops after the deepest one, and results are cached on disk (safetensors,
written atomically, validated on load), keyed by everything they depend on, the
full-content fingerprint of the weights included. Each cache file carries a SHA-256 of
its matrix and metadata (:mod:`factedit.integrity`); a file that does not match it is
refused, naming the file (delete it to recompute).

Accumulation is in float32 (or float64) whatever the weights' dtype: each batch's keys are cast
before the outer product, and the matrices come back in that dtype on the device of their layer.

Sharing between dtypes, downward only. Statistics computed on float32 weights also serve the same
weights cast to bfloat16 or float16: when they are saved, a signed alias file is written under the
key the cast model will look up (same fields, the fingerprint :func:`cast_fingerprint` gives for
that cast), pointing at the float32 file and recording its key. Measured against the cast weights'
own statistics (SmolLM2-135M's shapes, docs/integrity.md), the reused matrix differs by about as much
as the half-precision model's own pass does (1.3% vs 0.8% for bfloat16), two orders of magnitude below
the difference between two samples of the corpus; half-precision passes on a CPU are also slow.
Never the other way: aliases are written only for float32 weights and read only by bfloat16/float16
ones, so a float32 model always gets statistics computed on exactly its weights. Whether two models
hold "the same weights" is decided by content (the cast fingerprint), never by name.

Several processes (started with torchrun, :mod:`factedit.distributed`): the pass is sharded by document.
Every rank tokenizes its own documents (positions ``rank, rank + world, ...`` of the corpus order), the ranks
exchange the documents' token counts, and all of them replay the single-process pass's choice of text on
those counts alone (:class:`SamplePlan`: the same pools, the same length sort, the same cut at ``n_tokens``),
so the union of what the ranks count is exactly the one-process sample; each rank runs the model on its
own documents of that sample only. The sums are added up in float64 over ranks, the first rank of each
machine writes the cache file (atomically, under the same key as one process, so later single-process edits
read it) and the others read it after a barrier. The matrices equal one process's up to float rounding
(measured on tiny models: docs/distributed.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit import distributed
from factedit.errors import FactEditError
from factedit.hooks import TraceDict
from factedit.integrity import dumps_signed_json, load_signed, loads_signed_json, save_signed
from factedit.models.architectures import arch_for, check_layer
from factedit.models.fingerprint import cast_fingerprint, model_fingerprint
from factedit.models.placement import input_device, module_device
from factedit.models.tokens import document_start_of
from factedit.paths import atomic_write_bytes, cache_dir, compute_lock
from factedit.progress import Progress, as_progress
from factedit.stats.corpus import TextCorpus, open_corpus
from factedit.text import pad_id, pad_right

log = logging.getLogger(__name__)
FORMAT = "factedit-mom2-v2"  # v1 plus the content checksum
_REMEDY = "delete it to recompute"
ACC_DTYPES = {"float32": torch.float32, "float64": torch.float64}
ALIAS_FORMAT = "factedit-mom2-alias-v1"
BATCH_TOKENS = 8192  # padded tokens per forward pass
POOL_BATCHES = 16  # a pool holds text for this many batches before it is sorted by length and run
ROUND_DOCUMENTS = 64  # documents each rank tokenizes between two exchanges of token counts (sharded pass)
ALIAS_SUFFIX = ".alias.json"
SHARED_FROM = torch.float32  # statistics computed on weights of this dtype ...
SHARED_TO = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # ... also serve their casts to these
_CAST_MEMO_SIZE = 16
_cast_memo: OrderedDict[tuple[str, str], str] = OrderedDict()  # (fingerprint, dtype) -> cast fingerprint
_cast_memo_lock = threading.Lock()


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

    def _stem(self) -> str:
        values = asdict(self)
        if not values["document_start"]:  # files from before the field keep their names
            del values["document_start"]
        digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:20]
        return f"{self.module}-{digest}"

    def filename(self) -> str:
        return f"{self._stem()}.safetensors"

    def alias_filename(self) -> str:
        """The alias file a model with this key finds when its statistics were computed on float32 weights."""
        return f"{self._stem()}{ALIAS_SUFFIX}"


def stats_path(key: StatsKey, folder: Path | None = None) -> Path:
    return (folder or cache_dir("stats")) / key.filename()


def alias_path(key: StatsKey, folder: Path | None = None) -> Path:
    return (folder or cache_dir("stats")) / key.alias_filename()


def weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The one dtype of all floating-point weights and buffers in the state dict; ``None`` if mixed."""
    found = {t.dtype for t in model.state_dict(keep_vars=True).values() if torch.is_tensor(t) and t.is_floating_point()}
    return found.pop() if len(found) == 1 else None


def cast_fingerprints(model: nn.Module, fingerprint: str) -> dict[str, str]:
    """``{dtype name: fingerprint of model cast to it}`` for :data:`SHARED_TO`, remembered per content
    fingerprint (the same content always casts to the same bytes), so saving several layers casts once."""
    out: dict[str, str] = {}
    for name, dtype in SHARED_TO.items():
        memo_key = (fingerprint, name)
        with _cast_memo_lock:
            known = _cast_memo.get(memo_key)
        if known is None:
            known = cast_fingerprint(model, dtype)
        with _cast_memo_lock:
            _cast_memo[memo_key] = known
            _cast_memo.move_to_end(memo_key)
            while len(_cast_memo) > _CAST_MEMO_SIZE:
                _cast_memo.popitem(last=False)
        out[name] = known
    return out


def write_aliases(model: nn.Module, keys: Iterable[StatsKey], folder: Path | None = None) -> list[Path]:
    """File the float32 statistics under ``keys`` for the bfloat16 and float16 casts of ``model`` too:
    one signed alias per key and dtype, named by the key the cast model looks up (module docstring).

    Only for float32 weights whose fingerprint is the one in ``keys`` (weights changed meanwhile get no
    alias). An alias that cannot be written only costs a recomputation later, so it is logged, not raised.
    """
    keys = list(keys)
    if not keys or weights_dtype(model) != SHARED_FROM:
        return []
    fingerprint = keys[0].model_fingerprint
    started = time.perf_counter()
    casts = cast_fingerprints(model, fingerprint)
    if model_fingerprint(model) != fingerprint:
        log.warning("weights changed while their statistics were saved: no aliases for their bfloat16/float16 casts")
        return []
    written: list[Path] = []
    for dtype_name, cast in casts.items():
        for key in keys:
            alias_key = replace(key, model_fingerprint=cast)
            path = alias_path(alias_key, folder)
            record = {
                "key": asdict(alias_key),
                "weights_dtype": dtype_name,
                "source_key": asdict(key),
                "source_weights_dtype": str(SHARED_FROM).removeprefix("torch."),
                "target": key.filename(),
            }
            try:
                atomic_write_bytes(path, dumps_signed_json(record, ALIAS_FORMAT))
            except OSError as exc:
                log.warning(
                    "could not write the statistics alias %s (%s): a %s model will recompute", path, exc, dtype_name
                )
                continue
            written.append(path)
    log.info(
        "statistics of %d module(s) also filed for the %s casts of these weights (%.2fs)",
        len(keys),
        " and ".join(casts),
        time.perf_counter() - started,
    )
    return written


def _differing(stored: StatsKey, expected: StatsKey) -> str:
    """``"n_tokens (500, expected 300)"``: the fields that differ, for a one-line message."""
    a, b = asdict(stored), asdict(expected)
    return ", ".join(f"{k} ({a[k]!r}, expected {b[k]!r})" for k in a if a[k] != b[k])


def _key_from(value: object, path: Path) -> StatsKey:
    names = {f.name for f in fields(StatsKey)}
    if not isinstance(value, dict) or set(value) != names:
        raise FactEditError(f"statistics alias {path} is malformed (no valid key); {_REMEDY}")
    return StatsKey(**value)


def load_aliased(key: StatsKey, folder: Path | None = None) -> torch.Tensor | None:
    """The float32 statistics an alias for ``key`` points at, validated against the float32 key the alias
    records; ``None`` when there is no alias or its target is gone (then they are computed again).

    A corrupt alias, one for another key, or a target that does not match the recorded key is refused
    in one line naming the file.
    """
    path = alias_path(key, folder)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FactEditError(f"cannot read statistics alias {path} ({exc.strerror or exc}); {_REMEDY}") from exc
    record = loads_signed_json(raw, ALIAS_FORMAT, f"statistics alias {path}", remedy=_REMEDY)
    if not isinstance(record, dict):
        raise FactEditError(f"statistics alias {path} is malformed; {_REMEDY}")
    stored, source = _key_from(record.get("key"), path), _key_from(record.get("source_key"), path)
    if stored != key:
        raise FactEditError(f"statistics alias {path} was written for other {_differing(stored, key)}; {_REMEDY}")
    if replace(source, model_fingerprint=key.model_fingerprint) != key or record.get("target") != source.filename():
        raise FactEditError(f"statistics alias {path} points at statistics of other settings; {_REMEDY}")
    target = path.with_name(source.filename())
    if not target.is_file():
        log.info("statistics alias %s points at %s, which is gone: computing them again", path.name, target.name)
        return None
    moment = load_second_moment(target, source)
    log.info(
        "second moments of %s reused from %s: computed on %s weights whose %s cast is exactly this model's "
        "weights (alias %s)",
        key.module,
        target,
        record.get("source_weights_dtype"),
        record.get("weights_dtype"),
        path.name,
    )
    return moment


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


def length_batches(pool: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Length-sorted batches of at most ``batch_tokens`` padded tokens (little padding waste)."""
    batch: list[list[int]] = []
    for ids in sorted(pool, key=len):
        if batch and len(ids) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch


def collect_second_moments(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    layers: Iterable[int],
    corpus: TextCorpus,
    *,
    n_tokens: int,
    max_length: int = 1024,
    dtype: str = "float32",
    batch_tokens: int = BATCH_TOKENS,
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
    device = input_device(model)
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
            inp = tr[name].input  # on the layer's device, which may not be the embedding's
            k = inp[keep.to(inp.device)][:take].to(acc_dtype)
            sums[layer] = sums.get(layer, 0) + k.T @ k
        seen += take
        bar.advance(take)

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
        if pool and (doc is None or pool_tokens >= min(n_tokens - seen, POOL_BATCHES * batch_tokens)):
            for batch in length_batches(pool, batch_tokens):
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


class SamplePlan:
    """Which tokens :func:`collect_second_moments` counts, decided from the documents' token counts alone.

    Fed ``(position, length)`` of each document in corpus order, it keeps the same pools (flushed once they
    hold enough text for the rest of the sample, or :data:`POOL_BATCHES` batches), sorts a pool by length
    the same stable way and cuts at ``n_tokens`` the same way (whole documents, then the first tokens of
    one), and returns each flushed pool's choice as ``(position, tokens taken)``. Since the model is causal,
    the first ``t`` tokens of a document have the same keys whether or not the rest follows, so these
    pieces are exactly the one-process sample.
    """

    def __init__(self, n_tokens: int, batch_tokens: int = BATCH_TOKENS) -> None:
        self.n_tokens, self.batch_tokens = n_tokens, batch_tokens
        self.seen = 0
        self.done = False
        self._pool: list[tuple[int, int]] = []
        self._pool_tokens = 0

    def add(self, position: int, length: int) -> list[tuple[int, int]]:
        if self.done:
            return []
        if length > 0:
            self._pool.append((position, length))
            self._pool_tokens += length
        if self._pool and self._pool_tokens >= min(self.n_tokens - self.seen, POOL_BATCHES * self.batch_tokens):
            return self._flush()
        return []

    def end(self) -> list[tuple[int, int]]:
        """The corpus has no more documents."""
        chosen = self._flush() if self._pool and not self.done else []
        self.done = True
        return chosen

    def _flush(self) -> list[tuple[int, int]]:
        chosen = []
        for position, length in sorted(self._pool, key=lambda item: item[1]):
            if self.seen >= self.n_tokens:
                break
            take = min(length, self.n_tokens - self.seen)
            chosen.append((position, take))
            self.seen += take
        self._pool, self._pool_tokens = [], 0
        self.done = self.seen >= self.n_tokens
        return chosen


def collect_second_moments_sharded(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    layers: Iterable[int],
    corpus: TextCorpus,
    *,
    n_tokens: int,
    max_length: int = 1024,
    dtype: str = "float32",
    batch_tokens: int = BATCH_TOKENS,
    shuffle_seed: int | None = None,
    progress: Progress | bool | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """:func:`collect_second_moments` shared by all ranks (module docstring): the same sample, each rank's
    documents on that rank, the sums added up in float64. Every rank must call it with the same arguments;
    every rank gets the same result."""
    arch = arch_for(model)
    layers = sorted({check_layer(model, layer) for layer in layers})
    names = [arch.rewrite_at(layer) for layer in layers]
    acc_dtype = ACC_DTYPES[dtype]
    device = input_device(model)
    me, world = distributed.rank(), distributed.world_size()
    sums: dict[int, torch.Tensor] = {}
    counted = 0
    pid = pad_id(tok)
    plan = SamplePlan(n_tokens, batch_tokens)
    bar = as_progress(progress).stage(
        f"second moments of layer(s) {','.join(map(str, layers))} on {corpus.name}, rank {me} of {world} "
        "(computed once, then cached)",
        total=n_tokens,
        unit="tok",
    )

    def run(pieces: list[list[int]]) -> None:
        nonlocal counted
        for batch in length_batches(pieces, batch_tokens):
            ids, mask = pad_right(batch, pid, device)
            with torch.no_grad(), TraceDict(model, names, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.bool()
            for layer, name in zip(layers, names):
                inp = tr[name].input
                k = inp[keep.to(inp.device)].to(acc_dtype)
                sums[layer] = sums.get(layer, 0) + k.T @ k
            counted += int(keep.sum())

    mine: dict[int, list[int]] = {}  # position -> token ids of this rank's documents in the open pool
    docs = corpus.iter_documents(shuffle_seed)
    position = 0
    while not plan.done:
        lengths: list[tuple[int, int]] = []
        start = position
        for doc in docs:
            if position % world == me:
                ids = tok(doc, truncation=True, max_length=max_length)["input_ids"]
                mine[position] = ids
                lengths.append((position, len(ids)))
            position += 1
            if position - start == ROUND_DOCUMENTS * world:
                break
        ended = position - start < ROUND_DOCUMENTS * world  # every rank reads the same documents
        merged = sorted(
            item for part in distributed.all_gather_objects(lengths, "exchanging document lengths") for item in part
        )
        for pos, length in merged:
            chosen = plan.add(pos, length)
            if chosen or plan.done:
                before = plan.seen - sum(take for _, take in chosen)
                run([mine[p][:take] for p, take in chosen if p % world == me])
                mine = {p: ids for p, ids in mine.items() if p > pos}
                bar.advance(plan.seen - before)
            if plan.done:
                break
        if ended and not plan.done:
            before = plan.seen
            chosen = plan.end()
            run([mine[p][:take] for p, take in chosen if p % world == me])
            bar.advance(plan.seen - before)
    bar.close()
    seen = plan.seen
    dims = {layer: int(s.shape[0]) for layer, s in sums.items()}
    for part in distributed.all_gather_objects(dims, "exchanging statistics shapes"):
        dims.update(part)
    total = int(distributed.all_reduce_sum(torch.tensor(float(counted)), "adding up token counts"))
    if total != seen:  # every rank replays the same plan: a mismatch is a bug, never silently averaged
        raise FactEditError(f"ranks counted {total} tokens for a sample of {seen}: the shards disagree; run again")
    if seen == 0:
        raise FactEditError(f"corpus {corpus.name} produced no tokens")
    if seen < n_tokens:
        log.warning("corpus %s has only %d tokens (asked for %d)", corpus.name, seen, n_tokens)
    out_dtype = torch.float32 if dtype == "float32" else torch.float64
    result = {}
    for layer, name in zip(layers, names):
        local = sums.get(layer)
        if local is None or isinstance(local, int):
            dim = dims.get(layer)
            if dim is None:
                raise FactEditError(f"no rank saw any token for layer {layer}")
            local = torch.zeros(dim, dim, dtype=acc_dtype, device=module_device(model, name))
        result[layer] = (distributed.all_reduce_sum(local, f"adding up the statistics of layer {layer}") / seen).to(
            out_dtype
        )
    return result, seen


def _check_same_keys(keys: dict[int, StatsKey]) -> None:
    """Every rank must be about to compute the same statistics (same weights, corpus and settings)."""
    views = distributed.all_gather_objects(keys, "comparing the statistics settings of the ranks")
    for other, view in enumerate(views):
        if view != views[0]:
            detail = "; ".join(
                _differing(view[layer], views[0][layer]) for layer in views[0] if view.get(layer) != views[0][layer]
            )
            raise FactEditError(
                f"rank {other} asks for other statistics than rank 0 ({detail or 'other layers'}): "
                "start every rank with the same model, corpus and options"
            )


def _share_cached(result: dict[int, torch.Tensor], layers: list[int], missing: list[int]) -> list[int]:
    """Rank 0's view of the cache decides what is computed (so all ranks do the same passes); a layer
    cached on rank 0's disk but not on another machine's is sent to it. Returns the layers to compute."""
    missing = distributed.broadcast_object(missing, what="sharing which statistics are cached")
    held = distributed.all_gather_objects(sorted(result), "sharing which statistics are cached")
    for layer in layers:
        if layer in missing:
            result.pop(layer, None)
        elif any(layer not in have for have in held):
            moment = distributed.broadcast_tensor(result.get(layer), what=f"sending the statistics of layer {layer}")
            result.setdefault(layer, moment)
    return missing


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
    distributed.init(input_device(model))  # joins the process group when started by torchrun; else nothing
    sharded = distributed.collective()
    if sharded:
        _check_same_keys(keys)
    reads_aliases = weights_dtype(model) in SHARED_TO.values()  # downward only: never for float32 weights
    result = _read_cached(keys, layers, cache_folder, aliases=reads_aliases) if cache else {}
    missing = [layer for layer in layers if layer not in result]
    if sharded:
        missing = _share_cached(result, layers, missing)
    # Another process (a second job, a test worker) may be computing the same matrices: wait for it and
    # read its files. torchrun's ranks compute together instead, so they take no lock.
    locks = [stats_path(keys[layer], cache_folder) for layer in missing] if cache and not sharded else []
    with compute_lock(locks, "second moments"):
        if locks:  # what the process we waited for wrote
            result.update(_read_cached(keys, missing, cache_folder, aliases=reads_aliases))
            missing = [layer for layer in missing if layer not in result]
        _compute_missing(
            model, tok, text, keys, missing, result, cache=cache, cache_folder=cache_folder, progress=progress
        )
    # each matrix goes where its layer computes (layers of a placed model may sit on different devices)
    return {layer: result[layer].to(module_device(model, arch.rewrite_at(layer))) for layer in layers}


def _read_cached(
    keys: dict[int, StatsKey], layers: list[int], cache_folder: Path | None, *, aliases: bool
) -> dict[int, torch.Tensor]:
    """The layers whose matrices are in the cache (or, with ``aliases``, cast from a wider copy's)."""
    found: dict[int, torch.Tensor] = {}
    for layer in layers:
        key = keys[layer]
        path = stats_path(key, cache_folder)
        if path.is_file():
            found[layer] = load_second_moment(path, key)
        elif aliases and (shared := load_aliased(key, cache_folder)) is not None:
            found[layer] = shared
    return found


def _compute_missing(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    text: TextCorpus,
    keys: dict[int, StatsKey],
    missing: list[int],
    result: dict[int, torch.Tensor],
    *,
    cache: bool,
    cache_folder: Path | None,
    progress: Progress | bool | None,
) -> None:
    """Compute the layers not found in the cache into ``result`` in one pass and cache them; the sample
    settings are the keys' (every key of one call has the same)."""
    sharded = distributed.collective()
    if result:
        log.info("second moments for layer(s) %s read from the cache (corpus %s)", sorted(result), text.source)
    if missing:
        sample = keys[missing[0]]
        n_tokens = sample.n_tokens
        log.info(
            "computing second moments for layer(s) %s: %d tokens of %s (cached afterwards under %s)",
            missing,
            n_tokens,
            text.source,
            cache_folder or cache_dir("stats"),
        )
        started = time.perf_counter()
        collect = collect_second_moments_sharded if sharded else collect_second_moments
        computed, seen = collect(
            model,
            tok,
            missing,
            text,
            n_tokens=n_tokens,
            max_length=sample.max_length,
            dtype=sample.dtype,
            shuffle_seed=sample.shuffle_seed,
            progress=progress,
        )
        log.info("second moments for layers %s: %d tokens in %.1fs", missing, seen, time.perf_counter() - started)
        writes = not sharded or distributed.local_rank() == 0  # one writer per machine (its own disk)
        for layer, moment in computed.items():
            if cache and writes:
                save_second_moment(stats_path(keys[layer], cache_folder), moment, keys[layer], seen)
            result[layer] = moment
        if cache and writes:
            write_aliases(model, [keys[layer] for layer in computed], cache_folder)
        if sharded:
            distributed.barrier("waiting for the statistics to be written")
            if cache and not writes:  # the others read what was written: the very file later runs will read
                for layer in computed:
                    path = stats_path(keys[layer], cache_folder)
                    if path.is_file():
                        result[layer] = load_second_moment(path, keys[layer])
