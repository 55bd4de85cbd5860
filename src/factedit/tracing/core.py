"""Causal tracing of one fact (ROME paper §2.1, kmeng01/rome ``causal_trace.py``).

Three runs define the measurement:

* clean: the prompt as is; the answer is the model's top next token (unless given)
  and its probability is ``clean_prob``;
* corrupted: ``samples`` copies with Gaussian noise added to the *output of the
  embedding module* at the subject's tokens; the mean answer probability is
  ``low_prob``;
* restored: a corrupted run in which one state (token ``t``, layer ``l``) is put
  back to its clean value; the mean answer probability is the score.

Kinds of state: ``hidden`` (the block output at layer ``l``), ``mlp`` and ``attn``
(the module outputs at token ``t`` in a *window* of layers around ``l``; with the
official convention a window ``w`` covers layers ``l - w//2 … l + ceil(w/2) - 1``,
i.e. ``l-5 … l+4`` for ``w = 10``, clipped to the model's layers), and the severed
paths of the paper's Fig. 3: ``hidden_sever_mlp`` / ``hidden_sever_attn`` restore
the hidden state while the MLP (attention) outputs of the layers above ``l`` at
token ``t`` stay at their corrupted values (the official notebook's convention;
``sever_all_tokens=True`` freezes them at every token from ``t`` on).

Two computations give the same numbers:

* ``method="straightforward"``: the official way, one full forward of the clean
  prompt plus the noised copies per (kind, token, layer), logits everywhere;
* ``method="fast"`` (default) does less work. A restoration at (t, l) changes no
  state below its first restored layer (those come from the corrupted run, served
  by :class:`_KnownOutput` stubs in place of the skipped blocks) and no state at
  tokens before ``t`` (the corrupted run's keys/values are a prefix cache, as in
  :mod:`factedit.editing.values`); only the last token's answer probability is read
  (the forward stops at the final norm, the LM head runs on one vector per row).
  Tokens before the subject are identical in clean and corrupted runs, so their
  scores are the corrupted probability without any forward. Restorations that
  start at the same block share forwards, packed along the sequence without
  padding (:class:`_FastTracer`), at most ``batch_size`` restorations × noise
  samples per forward.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from factedit import precision
from factedit.editing.values import _KnownOutput, lm_logits
from factedit.errors import FactEditError
from factedit.hooks import Trace, TraceDict, swap_modules
from factedit.models.architectures import ArchSpec, arch_for, get_module, num_layers
from factedit.paths import atomic_write_bytes
from factedit.text import SubjectPrompt, encode_with_subject, target_ids

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
SEVERED_KINDS: tuple[str, ...] = ("hidden_sever_mlp", "hidden_sever_attn")
ALL_KINDS: tuple[str, ...] = KINDS + SEVERED_KINDS
METHODS: tuple[str, ...] = ("fast", "straightforward")
DEFAULT_SAMPLES = 10
DEFAULT_WINDOW = 10
DEFAULT_NOISE_FACTOR = 3.0
DEFAULT_SEED = 1
DEFAULT_BATCH_SIZE = 512


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for an MLP/attention score centred at ``layer`` (official convention)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


# --------------------------------------------------------------------------- inputs


def split_prompt(prompt: str, subject: str) -> str:
    """A template with ``{}`` for the subject: given as is, or made from a full prompt containing it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise FactEditError("prompt is empty")
    if not isinstance(subject, str) or not subject.strip():
        raise FactEditError("subject is empty")
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise FactEditError(f"subject {subject!r} does not occur in the prompt {prompt!r} (matching is case-sensitive)")
    return prompt.replace(subject, "{}", 1)


def answer_token(tok: PreTrainedTokenizerBase, prompt_text: str, answer: str) -> int:
    """First token of ``answer`` as it would follow the prompt (a space is added after a word, as ROME does)."""
    if not isinstance(answer, str) or not answer.strip():
        raise FactEditError(f"answer {answer!r} is empty: it tokenizes to nothing; give a word such as ' Paris'")
    if not answer[0].isspace() and prompt_text and not prompt_text[-1].isspace():
        answer = " " + answer
    try:
        ids = target_ids(tok, prompt_text, answer)
    except FactEditError as exc:
        raise FactEditError(f"answer {answer!r} tokenizes to nothing with this tokenizer") from exc
    return int(ids[0])


# --------------------------------------------------------------------------- result


@dataclass
class TraceResult:
    """Scores of one fact: ``scores[kind][token, layer]`` is the mean answer probability after restoring."""

    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]  # [first, last + 1), as the official code
    answer: str
    answer_id: int
    predicted: str
    predicted_id: int
    answer_is_prediction: bool
    clean_prob: float  # official "high_score"
    low_prob: float  # official "low_score": corrupted, nothing restored
    scores: dict[str, np.ndarray]
    samples: int
    noise: float
    window: int
    seed: int
    method: str
    sever_all_tokens: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    @property
    def num_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1] if self.scores else 0

    def effects(self, kind: str) -> np.ndarray:
        """Indirect effects: restored probability minus the corrupted one."""
        return self.scores[kind] - self.low_prob

    def peak(self, kind: str) -> tuple[int, int, float]:
        """(token, layer, score) of the highest score of one kind."""
        m = self.scores[kind]
        t, l = np.unravel_index(np.nanargmax(m), m.shape)
        return int(t), int(l), float(m[t, l])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["subject_range"] = list(self.subject_range)
        d["scores"] = {k: _nan_to_none(v) for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        d = dict(d)
        d["subject_range"] = tuple(d["subject_range"])
        d["scores"] = {k: np.array([[np.nan if x is None else x for x in row] for row in v], dtype=np.float64)
                       for k, v in d["scores"].items()}
        return cls(**d)

    def save(self, out_dir: str | Path, stem: str = "trace") -> list[Path]:
        """Write ``<stem>.json`` (everything) and ``<stem>.npz`` (score matrices), each atomically."""
        out = Path(out_dir)
        json_path, npz_path = out / f"{stem}.json", out / f"{stem}.npz"
        atomic_write_bytes(json_path, json.dumps(self.to_dict(), indent=1).encode())
        buf = io.BytesIO()
        np.savez(buf, clean_prob=np.float64(self.clean_prob), low_prob=np.float64(self.low_prob),
                 subject_range=np.array(self.subject_range), token_ids=np.array(self.token_ids),
                 **{f"scores_{k}": v for k, v in self.scores.items()})
        atomic_write_bytes(npz_path, buf.getvalue())
        return [json_path, npz_path]

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        path = Path(path)
        if path.is_dir():
            path = path / "trace.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FactEditError(f"cannot read a trace result from {path}: {exc}") from exc


def _nan_to_none(m: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(x) else round(float(x), 7) for x in row] for row in m]


# --------------------------------------------------------------------------- runs


@dataclass
class _Job:
    """One restoration: ``kind`` at token ``t`` centred at layer ``layer``; blocks from ``start`` on must run."""

    kind: str
    t: int
    layer: int
    start: int


class _Fact:
    """Clean and corrupted activations of one fact: everything a restoration can reuse."""

    def __init__(self, model: nn.Module, arch: ArchSpec, encoded: SubjectPrompt, noise: torch.Tensor,
                 kinds: Sequence[str], keep_corrupted_kv: bool) -> None:
        self.model, self.arch = model, arch
        self.device = next(model.parameters()).device
        self.n_layers = num_layers(model)
        self.ids = torch.tensor(encoded.ids, dtype=torch.long, device=self.device)
        self.first, self.last = encoded.subject_first, encoded.subject_last
        self.noise = noise  # (N, n_subject_tokens, d)
        self.samples = noise.shape[0]
        L = self.n_layers
        blocks = [arch.block(i) for i in range(L)]
        mlps = [arch.mlp_at(i) for i in range(L)]
        attns = [arch.attn_at(i) for i in range(L)]
        # Clean run: block, MLP and attention outputs at every token, and the next-token distribution.
        with torch.no_grad(), TraceDict(model, blocks + mlps + attns) as td, \
                Trace(model, arch.final_norm, stop=True) as fin:
            model(input_ids=self.ids[None], use_cache=False)
        self.clean_h = torch.stack([td[n].output[0] for n in blocks])  # (L, T, d)
        self.clean_mlp = torch.stack([td[n].output[0] for n in mlps])
        self.clean_attn = torch.stack([td[n].output[0] for n in attns])
        self.clean_dist = torch.softmax(lm_logits(model, arch, fin.output[0, -1]).float(), dim=-1)
        # Corrupted run: noised copies; keep block outputs, embeddings, keys/values (and severed modules' outputs).
        sever = [n for k, ns in (("hidden_sever_mlp", mlps), ("hidden_sever_attn", attns)) if k in kinds for n in ns]
        batch = self.ids[None].expand(self.samples, -1)
        cache = DynamicCache() if keep_corrupted_kv else None  # full layers: keep every token's keys/values
        with torch.no_grad(), Trace(model, arch.embed, edit_output=self.add_noise) as emb, \
                TraceDict(model, blocks + sever) as td, Trace(model, arch.final_norm, stop=True) as fin:
            model(input_ids=batch, cache=cache, use_cache=keep_corrupted_kv)
        self.corr_embed = emb.output  # (N, T, d)
        self.corr_h = torch.stack([td[n].output for n in blocks])  # (L, N, T, d)
        self.corr_sever = {n: td[n].output for n in sever}  # name -> (N, T, d)
        self.corr_kv = [(lyr.keys, lyr.values) for lyr in cache.layers] if cache is not None else None
        self.corr_dists = torch.softmax(lm_logits(model, arch, fin.output[:, -1]).float(), dim=-1)

    def add_noise(self, x: torch.Tensor, name: str = "") -> torch.Tensor:
        """Add the fixed noise samples at the subject tokens of rows 0..N-1 (or 1..N with a clean row 0)."""
        x = x.clone()
        rows = slice(x.shape[0] - self.samples, x.shape[0])
        x[rows, self.first : self.last + 1] += self.noise.to(x.dtype)
        return x


def _packed_masks(config: Any, t_slot: torch.Tensor, job_slot: torch.Tensor, pos: torch.Tensor, past: int,
                  dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive (1, 1, S, P+S) masks for restorations packed into one sequence.

    Slot ``q`` (of restoration ``job_slot[q]``, which restarts at token ``t_slot[q]``)
    sees the cached corrupted keys of tokens ``< t`` and, causally, the slots of its
    own restoration. Packing breaks the model's own mask construction, so sliding
    windows are applied here from the config: a ``{layer type: mask}`` dict for
    models with ``layer_types`` (Gemma 3, Qwen 2/3), one windowed mask for models
    whose every layer slides (Mistral, Phi-3 with ``sliding_window``).
    """
    device = t_slot.device
    n = t_slot.numel()
    past_ok = torch.arange(past, device=device)[None, :] < t_slot[:, None]
    idx = torch.arange(n, device=device)
    own_ok = (job_slot[:, None] == job_slot[None, :]) & (idx[:, None] >= idx[None, :])
    allowed = torch.cat([past_ok, own_ok], dim=1)
    key_pos = torch.cat([torch.arange(past, device=device), pos])
    window = getattr(config, "sliding_window", None)

    def additive(ok: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(ok.shape, dtype=dtype, device=device)
        return mask.masked_fill(~ok, torch.finfo(dtype).min)[None, None]

    def windowed() -> torch.Tensor:
        return additive(allowed & (key_pos[None, :] > pos[:, None] - int(window)))

    types = set(getattr(config, "layer_types", None) or [])
    if types and types != {"full_attention"}:
        unknown = types - {"full_attention", "sliding_attention"}
        if unknown or window is None:
            raise FactEditError(f"fast tracing does not support attention layer types {sorted(unknown)}; "
                                "use method='straightforward'")
        return {"full_attention": additive(allowed), "sliding_attention": windowed()}
    if not types and window is not None:
        return windowed()
    return additive(allowed)


class _FastTracer:
    """Runs restorations from their first changed layer and token on, many per forward.

    Restorations that start at the same block are packed: batch row ``n`` is noise
    sample ``n``; along the sequence, each restoration occupies the slots of its
    tokens ``t … T-1`` (no padding), attends to the corrupted prefix cache before its
    ``t`` and causally to its own slots (:func:`_packed_mask`).
    """

    max_slots = 512  # bounds the packed sequence (attention cost grows with its square)

    def __init__(self, fact: _Fact, answer_id: int, window: int, batch_size: int,
                 sever_all_tokens: bool) -> None:
        self.f = fact
        self.answer_id = answer_id
        self.window = window
        self.batch_size = batch_size
        self.sever_all_tokens = sever_all_tokens
        self.blocks = get_module(fact.model, fact.arch.blocks)

    def start_layer(self, kind: str, layer: int) -> int:
        if kind in ("mlp", "attn"):
            return window_layers(layer, self.window, self.f.n_layers).start
        return layer + 1  # hidden and severed: block ``layer``'s output is known

    def run(self, jobs: list[_Job], bar: tqdm) -> np.ndarray:
        scores = np.empty(len(jobs))
        groups: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.start].append(i)
        per_chunk = max(1, self.batch_size // self.f.samples)
        T = len(self.f.ids)
        for start in sorted(groups):
            chunk: list[int] = []
            slots = 0
            for i in sorted(groups[start], key=lambda i: jobs[i].t):
                n = T - jobs[i].t
                if chunk and (len(chunk) >= per_chunk or slots + n > self.max_slots):
                    scores[chunk] = self._chunk([jobs[k] for k in chunk], start)
                    bar.update(len(chunk))
                    chunk, slots = [], 0
                chunk.append(i)
                slots += n
            if chunk:
                scores[chunk] = self._chunk([jobs[k] for k in chunk], start)
                bar.update(len(chunk))
        return scores

    def _chunk(self, jobs: list[_Job], start: int) -> np.ndarray:
        f, arch, model = self.f, self.f.arch, self.f.model
        N, T, dev = f.samples, len(f.ids), f.device
        lengths = [T - j.t for j in jobs]
        first_slot = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        job_slot = torch.repeat_interleave(torch.arange(len(jobs), device=dev), torch.tensor(lengths, device=dev))
        t_slot = torch.tensor([j.t for j in jobs], device=dev)[job_slot]
        pos = t_slot + torch.arange(job_slot.numel(), device=dev) - torch.tensor(first_slot, device=dev)[job_slot]
        past = max(j.t for j in jobs)
        masks = _packed_masks(model.config.get_text_config(), t_slot, job_slot, pos, past, model.dtype)
        mask = ({k: m.expand(N, -1, -1, -1) for k, m in masks.items()} if isinstance(masks, dict)
                else masks.expand(N, -1, -1, -1))
        # No config: full layers keep the whole prefix (a sliding layer would drop early tokens).
        kv = [(None, None) if i < start else (k[:, :, :past], v[:, :, :past]) for i, (k, v) in enumerate(f.corr_kv)]
        cache = DynamicCache(ddp_cache_data=kv)

        # Edits of module outputs: name -> [(slots, values (N, len(slots), d))].
        edits: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        known = f.corr_h[start - 1][:, pos].clone() if start > 0 else None
        for job, s0 in zip(jobs, first_slot):
            if job.kind in ("mlp", "attn"):
                clean = f.clean_mlp if job.kind == "mlp" else f.clean_attn
                slot = torch.tensor([s0], device=dev)
                for layer in window_layers(job.layer, self.window, f.n_layers):
                    name = arch.mlp_at(layer) if job.kind == "mlp" else arch.attn_at(layer)
                    edits[name].append((slot, clean[layer, job.t].expand(N, 1, -1)))
                continue
            known[:, s0] = f.clean_h[job.layer, job.t]
            if job.kind in SEVERED_KINDS:
                toks = torch.arange(job.t, T if self.sever_all_tokens else job.t + 1, device=dev)
                for layer in range(job.layer + 1, f.n_layers):
                    name = arch.mlp_at(layer) if job.kind == "hidden_sever_mlp" else arch.attn_at(layer)
                    edits[name].append((toks - job.t + s0, f.corr_sever[name][:, toks]))
        merged = {name: (torch.cat([s for s, _ in lst]), torch.cat([v for _, v in lst], dim=1))
                  for name, lst in edits.items()}

        def put(out: torch.Tensor, name: str) -> torch.Tensor:
            slots, values = merged[name]
            return out.index_copy(1, slots, values.to(out.dtype))

        stubs = {arch.block(i): _KnownOutput(self.blocks[i], known) for i in range(start)}
        # From block 0 on, the blocks read the corrupted embeddings of the packed tokens.
        embed = (Trace(model, arch.embed, retain_output=False,
                       edit_output=lambda out, name: f.corr_embed[:, pos].to(out.dtype))
                 if start == 0 else contextlib.nullcontext())
        ids = f.ids[pos].expand(N, -1)
        with torch.no_grad(), swap_modules(model, stubs), embed, \
                TraceDict(model, list(merged), retain_output=False, edit_output=put), \
                Trace(model, arch.final_norm, stop=True) as fin:
            model(input_ids=ids, attention_mask=mask, position_ids=pos.expand(N, -1), cache=cache, use_cache=True)
        last = torch.tensor([s0 + n - 1 for s0, n in zip(first_slot, lengths)], device=dev)
        hidden = fin.output[:, last]  # (N, jobs, d)
        probs = torch.softmax(lm_logits(model, arch, hidden).float(), dim=-1)[..., self.answer_id]
        return probs.mean(0).cpu().numpy()


class _StraightTracer:
    """The official computation: per restoration one full forward of the clean prompt plus the noised copies."""

    def __init__(self, fact: _Fact, answer_id: int, window: int, sever_all_tokens: bool) -> None:
        self.f = fact
        self.answer_id = answer_id
        self.window = window
        self.sever_all_tokens = sever_all_tokens

    def run(self, jobs: list[_Job], bar: tqdm) -> np.ndarray:
        scores = np.empty(len(jobs))
        for i, job in enumerate(jobs):
            scores[i] = self._one(job)
            bar.update(1)
        return scores

    def _one(self, job: _Job) -> float:
        f, arch, model = self.f, self.f.arch, self.f.model
        batch = f.ids[None].expand(f.samples + 1, -1)
        patch: dict[str, list[int]] = defaultdict(list)  # module -> tokens copied from the clean row 0
        unpatch: dict[str, list[int]] = defaultdict(list)  # module -> tokens frozen at corrupted values
        if job.kind in ("mlp", "attn"):
            for layer in window_layers(job.layer, self.window, f.n_layers):
                patch[arch.mlp_at(layer) if job.kind == "mlp" else arch.attn_at(layer)].append(job.t)
        else:
            patch[arch.block(job.layer)].append(job.t)
            if job.kind in SEVERED_KINDS:
                tokens = list(range(job.t, len(f.ids))) if self.sever_all_tokens else [job.t]
                for layer in range(job.layer + 1, f.n_layers):
                    name = arch.mlp_at(layer) if job.kind == "hidden_sever_mlp" else arch.attn_at(layer)
                    unpatch[name].extend(tokens)

        def edit(out: torch.Tensor, name: str) -> torch.Tensor:
            if name == arch.embed:
                return f.add_noise(out)
            out = out.clone()
            for t in patch.get(name, []):
                out[1:, t] = out[0, t]
            for t in unpatch.get(name, []):
                out[1:, t] = f.corr_sever[name][:, t]
            return out

        with torch.no_grad(), TraceDict(model, [arch.embed, *patch, *unpatch], retain_output=False, edit_output=edit):
            logits = model(input_ids=batch, use_cache=False).logits
        probs = torch.softmax(logits[1:, -1].float(), dim=-1)[:, self.answer_id]
        return float(probs.mean())


# --------------------------------------------------------------------------- API


def make_noise(samples: int, n_tokens: int, hidden: int, scale: float, seed: int) -> torch.Tensor:
    """The fixed noise of one trace: ``scale`` × standard normal, from a seeded generator (CPU, float32)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((samples, n_tokens, hidden), generator=gen) * float(scale)


@torch.no_grad()
def causal_trace(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    noise_factor: float = DEFAULT_NOISE_FACTOR,
    window: int = DEFAULT_WINDOW,
    seed: int = DEFAULT_SEED,
    method: str = "fast",
    batch_size: int = DEFAULT_BATCH_SIZE,
    tokens: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
    sever_all_tokens: bool = False,
    autocast: str | None = None,
    progress: bool = False,
) -> TraceResult:
    """Trace one fact: which hidden states / MLP / attention outputs carry it to the answer.

    ``prompt`` is the full prompt containing ``subject`` (or a template with ``{}``).
    ``noise``: fixed noise scale; ``None`` uses ``noise_factor`` × the std of subject-token
    embeddings over the known facts (computed once per model, cached on disk).
    ``tokens``: restrict the traced token positions (all kinds, or per kind); ``layers``:
    restrict the (centre) layers; scores not traced are NaN.
    ``autocast``: "bfloat16" runs the forward passes under ``torch.autocast`` (much faster on
    CPUs with AMX; scores then differ from float32 ones by bfloat16 rounding).
    """
    from factedit.tracing.noise import noise_scale  # local: noise.py imports this module's constants

    started = time.perf_counter()
    kinds = _check_kinds(kinds)
    precision.autocast_dtype(autocast)  # refuse a bad option before any work
    if method not in METHODS:
        raise FactEditError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(samples, int) or samples < 1:
        raise FactEditError(f"samples must be a positive integer, got {samples!r}")
    if not isinstance(window, int) or window < 1:
        raise FactEditError(f"window must be a positive integer, got {window!r}")
    if batch_size < 1:
        raise FactEditError(f"batch size must be positive, got {batch_size}")
    arch = arch_for(model)
    template = split_prompt(prompt, subject)
    encoded = encode_with_subject(tokenizer, template, subject)
    if len(encoded) == 0:
        raise FactEditError("prompt tokenizes to nothing")
    answer_given = answer is not None
    answer_id = answer_token(tokenizer, encoded.text, answer) if answer_given else None
    T, L = len(encoded), num_layers(model)
    wanted = _token_positions(tokens, kinds, T)
    if layers is None:
        layer_list = list(range(L))
    else:
        layer_list = sorted({int(x) + L if int(x) < 0 else int(x) for x in layers})
        if not layer_list or any(not 0 <= x < L for x in layer_list):
            raise FactEditError(f"layers {list(layers)} out of range: this model has layers 0..{L - 1}")
    if noise is None:
        scale = noise_factor * noise_scale(model, tokenizer)
    else:
        scale = float(noise)
        if not math.isfinite(scale) or scale < 0:
            raise FactEditError(f"noise scale must be a non-negative number, got {noise!r}")

    embed_module = get_module(model, arch.embed)
    d = int(getattr(embed_module, "embedding_dim", 0) or model.config.get_text_config().hidden_size)
    n_subj = encoded.subject_last - encoded.subject_first + 1
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    noise_t = make_noise(samples, n_subj, d, scale, seed).to(device=device, dtype=dtype)
    with precision.autocast(model, autocast):
        fact = _Fact(model, arch, encoded, noise_t, kinds, keep_corrupted_kv=(method == "fast"))

    predicted_id = int(fact.clean_dist.argmax())
    if answer_id is None:
        answer_id = predicted_id
    matches = answer_id == predicted_id
    predicted = tokenizer.decode([predicted_id])
    answer_text = tokenizer.decode([answer_id])
    if not matches:
        log.warning("the model's top prediction for %r is %r (p=%.3f), not the given answer %r (p=%.3f); "
                    "tracing %r anyway", encoded.text, predicted, float(fact.clean_dist[predicted_id]),
                    answer_text, float(fact.clean_dist[answer_id]), answer_text)
    clean_prob = float(fact.clean_dist[answer_id])
    low_prob = float(fact.corr_dists[:, answer_id].mean())

    scores = {k: np.full((T, L), np.nan) for k in kinds}
    jobs: list[_Job] = []
    if method == "fast":
        tracer: _FastTracer | _StraightTracer = _FastTracer(fact, answer_id, window, batch_size, sever_all_tokens)
    else:
        tracer = _StraightTracer(fact, answer_id, window, sever_all_tokens)
    for kind in kinds:
        for t in wanted[kind]:
            if method == "fast" and t < encoded.subject_first:
                scores[kind][t, layer_list] = low_prob  # nothing differs from the clean run before the subject
                continue
            for layer in layer_list:
                start = tracer.start_layer(kind, layer) if isinstance(tracer, _FastTracer) else 0
                jobs.append(_Job(kind, t, layer, start))
    with tqdm(total=len(jobs), desc=f"trace ({method})", unit="restore", disable=not progress, leave=False) as bar:
        with precision.autocast(model, autocast):
            values = tracer.run(jobs, bar)
    for job, value in zip(jobs, values):
        scores[job.kind][job.t, job.layer] = value
    elapsed = time.perf_counter() - started
    log.info("traced %r (%d tokens, %d restorations, %s) in %.1fs", encoded.text, T, len(jobs), method, elapsed)
    return TraceResult(
        prompt=encoded.text, subject=subject, tokens=[tokenizer.decode([i]) for i in encoded.ids],
        token_ids=list(encoded.ids), subject_range=(encoded.subject_first, encoded.subject_last + 1),
        answer=answer_text, answer_id=int(answer_id), predicted=predicted, predicted_id=predicted_id,
        answer_is_prediction=matches, clean_prob=clean_prob, low_prob=low_prob, scores=scores,
        samples=samples, noise=scale, window=window, seed=seed, method=method, sever_all_tokens=sever_all_tokens,
        meta={"seconds": round(elapsed, 3), "restorations": len(jobs), "answer_given": answer_given,
              "model_type": getattr(model.config, "model_type", None), "num_layers": L,
              "noise_factor": noise_factor if noise is None else None, "batch_size": batch_size,
              "autocast": str(precision.autocast_dtype(autocast)).replace("torch.", "") if autocast else None},
    )


def _check_kinds(kinds: Sequence[str] | str) -> list[str]:
    if isinstance(kinds, str):
        kinds = list(KINDS) if kinds == "all" else [kinds]
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise FactEditError(f"unknown kind(s) {bad or kinds}: choose from {', '.join(ALL_KINDS)} or 'all'")
    return kinds


def _token_positions(tokens: Sequence[int] | Mapping[str, Sequence[int]] | None, kinds: list[str],
                     n_tokens: int) -> dict[str, list[int]]:
    def check(ts: Sequence[int]) -> list[int]:
        out = sorted({int(t) + n_tokens if int(t) < 0 else int(t) for t in ts})
        if any(not 0 <= t < n_tokens for t in out):
            raise FactEditError(f"token positions {list(ts)} out of range for a {n_tokens}-token prompt")
        return out

    if tokens is None:
        return {k: list(range(n_tokens)) for k in kinds}
    if isinstance(tokens, Mapping):
        return {k: check(tokens[k]) if k in tokens else list(range(n_tokens)) for k in kinds}
    ts = check(tokens)
    return {k: ts for k in kinds}
