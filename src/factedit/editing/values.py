"""Values: optimise the vector a module should output at the subject so the model says the target.

ROME's v* (added to the rewrite module's output) and MEMIT's z (added to a
block's output) are the same optimisation: a per-request vector ``delta`` added
at the subject's last token of every prompt, trained with Adam on

    NLL(target | prompts) + kl_factor * KL(p(.|"{subject} is a") || p_init) + wd * |delta| / |v_init|²,

clamped to ``clamp_norm_factor * |v_init|``, stopped early below ``early_stop_loss``
(kmeng01/rome ``compute_v.py``). Several requests are optimised together, each
with its own delta and its own early stop.

The fast path (``prefix_cache``) does the same arithmetic with less work: the
prompt tokens before the subject's last token never depend on delta (causal
attention) and no block below the edited one does either, so one no-grad pass
stores their keys/values and the hidden state entering the edited block; each
step then runs only the edited block and those above it, only on the tokens from
the subject's last one on, and applies the LM head only where the loss reads.
For Llama-style families (:mod:`factedit.models.live`) those steps skip the model's ``forward``
altogether and the edited block with it; the others run through the model with stubs below the edit.

NAS (``value_norm_anchor``, off by default; Liu et al. 2026, "Norm Anchors Make Model Edits Last",
arXiv 2602.02543, official code SasyaTitech/NAS ``util/vstar_stats.py`` and ``*/compute_z.py``): in a long
sequence the solved value vectors and the edited weights amplify each other's norms until the model
collapses (AlphaEdit: from about 4K to over 21K single edits with NAS, by the paper). Once δ is optimised,
the value the edit writes, the edited layer's MLP output v* = v₀ + δ (v₀: the MLP's current output at the
first prompt's lookup, ROME's target itself), is rescaled to a fixed norm measured on the unedited model
(:func:`reference_value_norm`), and an edit whose |v*| exceeds ``value_norm_skip_factor`` anchors is
dropped (δ = 0). The returned delta is then s·v* − v₀: MEMIT's z = (h − v₀) + s·v*, ROME's v* = s·v*.
It is a rescaling after the optimisation, not a constraint or a loss term (as the official code).
Deviations: v₀ is read in the no-grad pass that starts the optimisation (on the same model, so the same
vector the official code reads after it); the MLP output is the module ``arch.mlp_at(layer)`` (for a family
with a norm after the MLP, Gemma's, v* is rescaled before that norm); see :func:`reference_value_norm`.

Devices: with a device map, the input ids go to the embedding's device, while delta, the
index tensors and the loss live on the device of the module whose output is edited (the
rewrite layer's); logits and states are moved there, never the other way round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import ValueOptimizationParams
from factedit.editing.keys import lookup_position
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.hooks import Trace, frozen, known_blocks
from factedit.models.architectures import ArchSpec, arch_for, check_layer
from factedit.models.cache import Cache, cache_states, full_cache, gather_positions, select_rows
from factedit.models.live import LiveBatch, LiveBlocks
from factedit.models.placement import input_device, module_device
from factedit.models.runtime import lm_logits
from factedit.progress import Progress, as_progress
from factedit.text import encode_with_subject, pad_id, pad_right, target_ids

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


@dataclass
class ValueProblem:
    """One request: prompts whose continuation must become ``target``, and prompts kept close (KL)."""

    rewrite_prompts: list[list[int]]  # prompt ids followed by target ids[:-1]
    rewrite_lookup: list[int]
    prompt_lengths: list[int]  # where the target starts in each rewrite prompt
    kl_prompts: list[list[int]]
    kl_lookup: list[int]
    target: list[int]
    kl_prompt_texts: tuple[str, ...] = (KL_PROMPT,)  # the KL prompts before encoding ("{}" = the subject)
    # Optional (ROME's "applied" objective): what each prompt sees of the change is
    # ``gain[i] * (delta + offset)`` instead of ``delta``; gains for the rewrite prompts, then the KL prompts.
    gains: list[float] | None = None
    offset: torch.Tensor | None = None  # (d,)

    def with_response(self, gains: list[float], offset: torch.Tensor) -> ValueProblem:
        """The same problem, with each prompt's response to the change set (see ``gains``)."""
        if len(gains) != len(self.rewrite_prompts) + len(self.kl_prompts):
            raise ValueError(f"{len(gains)} gains for {len(self.rewrite_prompts) + len(self.kl_prompts)} prompts")
        return replace(self, gains=list(gains), offset=offset)


def build_value_problem(
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    templates: list[str],
    fact_token: str = "subject_last",
    kl_prompts: tuple[str, ...] = (KL_PROMPT,),
) -> ValueProblem:
    target = target_ids(tok, request.text, request.new_text)
    rewrite, lookup, lengths = [], [], []
    for template in templates:
        encoded = encode_with_subject(tok, template.replace("{}", request.prompt), request.subject)
        rewrite.append(encoded.ids + target[:-1])
        lookup.append(lookup_position(encoded, fact_token))
        lengths.append(len(encoded.ids))
    kl = [encode_with_subject(tok, p, request.subject) for p in kl_prompts]
    return ValueProblem(
        rewrite_prompts=rewrite,
        rewrite_lookup=lookup,
        prompt_lengths=lengths,
        kl_prompts=[p.ids for p in kl],
        kl_lookup=[lookup_position(p, fact_token) for p in kl],
        target=target,
        kl_prompt_texts=tuple(kl_prompts),
    )


@dataclass
class ValueResult:
    target_init: torch.Tensor  # (n, d): the module's unedited output at the lookup of each problem's first prompt
    delta: torch.Tensor  # (n, d)
    steps: int
    losses: list[list[dict[str, float]]] = field(default_factory=list)  # per problem, per evaluated step
    # Under NAS (or when asked): |v*| = |v₀ + δ| of each problem before anchoring, and which edits NAS dropped.
    value_norms: torch.Tensor | None = None  # (n,)
    anchor_skipped: torch.Tensor | None = None  # (n,) bool

    @property
    def targets(self) -> torch.Tensor:
        return self.target_init + self.delta


@dataclass
class _Rows:
    """All prompts of all problems, flattened into one batch."""

    ids: list[list[int]]
    lookup: torch.Tensor  # (B,)
    problem: torch.Tensor  # (B,) problem index of each row
    rw_rows: torch.Tensor  # (M,) row of each target token
    rw_pos: torch.Tensor  # (M,) position whose logits predict it
    rw_ids: torch.Tensor  # (M,) the target token
    rw_row_of_token: torch.Tensor  # (M,) index into rewrite rows
    rw_problem: torch.Tensor  # (R,) problem of each rewrite row
    rw_target_len: torch.Tensor  # (R,)
    kl_rows: torch.Tensor  # (K,)
    kl_problem: torch.Tensor  # (K,)
    first_rows: torch.Tensor  # (n,) first rewrite row of each problem
    gain: torch.Tensor | None = None  # (B,) each row's share of the change; None = every row gets delta
    offset: torch.Tensor | None = None  # (B, d) gain * offset of the row's problem

    def injected(self, delta: torch.Tensor) -> torch.Tensor:
        """(B, d): what is added at each row's lookup, from the per-problem ``delta`` (n, d)."""
        per_row = delta[self.problem]
        if self.gain is None:
            return per_row
        return self.gain[:, None] * per_row + self.offset


def _flatten(problems: list[ValueProblem], device: torch.device) -> _Rows:
    ids, lookup, problem = [], [], []
    rw_rows, rw_pos, rw_ids, rw_tok_row, rw_problem, rw_len = [], [], [], [], [], []
    kl_rows, kl_problem, first_rows = [], [], []
    gains, offsets = [], []
    responsive = any(p.gains is not None for p in problems)
    for p_idx, prob in enumerate(problems):
        if responsive:
            n_rows = len(prob.rewrite_prompts) + len(prob.kl_prompts)
            row_gains = prob.gains if prob.gains is not None else [1.0] * n_rows
            gains.extend(row_gains)
            offsets.extend([(g, prob.offset) for g in row_gains])
        first_rows.append(len(ids))
        for prompt, look, length in zip(prob.rewrite_prompts, prob.rewrite_lookup, prob.prompt_lengths, strict=True):
            row = len(ids)
            for j, token in enumerate(prob.target):
                rw_rows.append(row)
                rw_pos.append(length - 1 + j)
                rw_ids.append(token)
                rw_tok_row.append(len(rw_problem))
            rw_problem.append(p_idx)
            rw_len.append(len(prob.target))
            ids.append(prompt)
            lookup.append(look)
            problem.append(p_idx)
        for prompt, look in zip(prob.kl_prompts, prob.kl_lookup, strict=True):
            kl_rows.append(len(ids))
            kl_problem.append(p_idx)
            ids.append(prompt)
            lookup.append(look)
            problem.append(p_idx)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    gain = offset = None
    if responsive:
        gain = torch.tensor(gains, dtype=torch.float32, device=device)
        width = next(p.offset.numel() for p in problems if p.offset is not None)
        offset = torch.stack(
            [
                g * o.to(device, torch.float32) if o is not None else torch.zeros(width, device=device)
                for g, o in offsets
            ]
        )
    return _Rows(
        ids,
        t(lookup),
        t(problem),
        t(rw_rows),
        t(rw_pos),
        t(rw_ids),
        t(rw_tok_row),
        t(rw_problem),
        t(rw_len).float(),
        t(kl_rows),
        t(kl_problem),
        t(first_rows),
        gain,
        offset,
    )


def _per_problem_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, torch.ones_like(values))
    return total / count.clamp_min(1)


class _PrefixCache:
    """What one no-grad pass knows that no optimisation step can change.

    The prefix keys/values are stored *left-aligned*: row i's ``lookup[i]`` prefix
    tokens sit at cache slots ``past - lookup[i] .. past - 1`` (earlier slots are
    masked out). Every suffix token is then exactly as far from each prefix token
    in cache slots as in the real sequence, so the model builds the correct
    causal, padding and sliding-window masks itself from a 2D mask; RoPE/learned
    positions come from ``position_ids``. The caches have only full (non-sliding)
    layers so that sliding-window layers keep their whole prefix.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        site: str,
        layer: int,
        rows: _Rows,
        pad: int,
        value_site: str | None = None,
        live_from: int | None = None,
    ) -> None:
        device = input_device(model)  # the ids and what is built from them; rows' tensors are on the site's device
        lookup = rows.lookup.to(device)
        ids, mask = pad_right(rows.ids, pad, device)
        cache = full_cache()  # full layers keep every position (a sliding layer would not)
        names = [site] + ([arch.block(layer - 1)] if layer > 0 else [])
        if value_site is not None and value_site not in names:  # NAS's v₀ (the MLP output), read in this pass
            names.append(value_site)
        if live_from is not None and arch.block(live_from - 1) not in names:  # the live blocks' input
            names.append(arch.block(live_from - 1))
        traces = {name: Trace(model, name, retain_output=True) for name in names}
        try:
            with torch.no_grad(), Trace(model, arch.final_norm, retain_output=False, stop=True):
                model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        finally:
            for trace in traces.values():
                trace.close()
        site_out = traces[site].output
        b = torch.arange(len(rows.ids), device=site_out.device)
        self.site_at_lookup = site_out[b, rows.lookup.to(site_out.device)]
        self.value_at_lookup = None
        if value_site is not None:
            value_out = traces[value_site].output
            self.value_at_lookup = value_out[b.to(value_out.device), rows.lookup.to(value_out.device)]
        self.layer = layer
        self.past = int(rows.lookup.max())
        lengths = mask.sum(1)
        self.suffix_len = lengths - lookup
        width = int(self.suffix_len.max())
        offsets = torch.arange(width, device=device)
        gather = (lookup[:, None] + offsets[None, :]).clamp(max=ids.shape[1] - 1)
        self.suffix_ids = torch.where(offsets[None] < self.suffix_len[:, None], ids.gather(1, gather), pad)
        self.position_ids = lookup[:, None] + offsets[None, :]

        def live_positions(states: torch.Tensor, block: str) -> torch.Tensor:
            index = gather.to(states.device)[..., None].expand(-1, -1, states.shape[-1])
            return states.gather(1, index).to(module_device(model, block))

        self.below = None
        if layer > 0 and live_from is None:  # the input of block ``layer``, for the stubs below it (model forward)
            self.below = live_positions(traces[arch.block(layer - 1)].output, arch.block(layer))
        # With live blocks from ``live_from``: their unedited input (the output of block ``live_from - 1``).
        self.live_input = None
        if live_from is not None:
            self.live_input = live_positions(traces[arch.block(live_from - 1)].output, arch.block(live_from))
        # slot s of row i holds prefix token s - (past - lookup[i]) (slots before the prefix: masked filler)
        shift = self.past - lookup
        slots = torch.arange(self.past, device=device)
        source = (slots[None, :] - shift[:, None]).clamp(min=0)
        self.kv = gather_positions(cache_states(cache), source)
        self.prefix_ok = slots[None, :] >= shift[:, None]
        self.suffix_ok = offsets[None, :] < self.suffix_len[:, None]
        self.mask = torch.cat([self.prefix_ok, self.suffix_ok], dim=1).long()  # (B, past + S)

    def select(self, row_ids: torch.Tensor) -> _PrefixCache:
        """The same cache for a subset of rows (requests that stopped early drop out of the batch)."""
        sub = object.__new__(_PrefixCache)
        sub.__dict__.update(self.__dict__)
        names = ("suffix_ids", "position_ids", "suffix_len", "mask", "prefix_ok", "suffix_ok")
        for name in (*names, "site_at_lookup", "value_at_lookup", "below", "live_input"):
            value = getattr(self, name)
            if value is not None:
                setattr(sub, name, value[row_ids.to(value.device)])
        sub.kv = select_rows(self.kv, row_ids)
        return sub

    def new_cache(self) -> Cache:
        """A fresh cache of the prefix states (a forward extends the cache it is given)."""
        return full_cache(self.kv)


def optimize_values(
    model: nn.Module,
    arch: ArchSpec,
    problems: list[ValueProblem],
    *,
    site: str,
    layer: int,
    hparams: ValueOptimizationParams,
    pad: int,
    progress: Progress | bool | None = None,
    report_value_norms: bool = False,
) -> ValueResult:
    """Optimise one delta per problem at the output of module ``site`` (inside block ``layer``).

    ``progress`` gets one stage, "value optimisation", advanced once per step with the mean loss.
    Delta and the loss live on the device ``site`` computes on. With ``hparams.value_norm_anchor`` set,
    the optimised deltas are anchored (NAS, see the module docstring); ``report_value_norms`` fills
    ``value_norms`` without NAS too (what :func:`reference_value_norm` measures).
    """
    anchored = hparams.value_norm_anchor is not None
    device = module_device(model, site)
    rows = _flatten(problems, device)
    n = len(problems)
    value_site = _value_site(arch, site, layer) if anchored or report_value_norms else None
    live = _live_blocks(model, arch, site, layer, rows) if hparams.prefix_cache else None
    prefix = _PrefixCache(model, arch, site, layer, rows, pad, value_site, live.first if live else None)
    batch = _live_batch(live, prefix, rows, model.dtype) if live else None
    target_init = prefix.site_at_lookup.to(device)[rows.first_rows].float()
    delta = torch.zeros_like(target_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * target_init.norm(dim=1)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    kl_init: torch.Tensor | None = None
    history: list[list[dict[str, float]]] = [[] for _ in range(n)]
    steps = 0

    active = torch.arange(n, device=device)
    sub_rows, sub_prefix, sub_batch = rows, prefix, batch

    def forward(rows_: _Rows, prefix_: _PrefixCache, injected: torch.Tensor, batch_: LiveBatch | None = None):
        if batch_ is not None:
            return _live_forward(model, arch, live, batch_, prefix_, rows_, injected)
        if hparams.prefix_cache:
            return _fast_forward(model, arch, site, rows_, prefix_, injected)
        return _plain_forward(model, arch, site, rows_, injected, pad)

    with (
        frozen(model),
        as_progress(progress).stage("value optimisation", total=hparams.v_num_grad_steps, unit="step") as stage,
    ):
        for it in range(hparams.v_num_grad_steps):
            steps = it + 1
            opt.zero_grad()
            m = len(active)
            if m != int(sub_rows.first_rows.numel()):
                # Requests that reached the early-stop loss leave the batch: no more work for their rows.
                sub_rows = _flatten([problems[i] for i in active.tolist()], device)
                kept_rows = torch.isin(rows.problem, active).nonzero().squeeze(1)
                sub_prefix = prefix.select(kept_rows)
                if batch is not None:
                    sub_batch = batch.select(kept_rows, *_read_positions(sub_rows))
            d = delta[active]
            rw_logits, kl_logits = forward(sub_rows, sub_prefix, sub_rows.injected(d), sub_batch)
            rw_logp = torch.log_softmax(rw_logits.float(), dim=-1).gather(1, sub_rows.rw_ids[:, None]).squeeze(1)
            per_row = torch.zeros(len(sub_rows.rw_problem), device=device).index_add(
                0, sub_rows.rw_row_of_token, rw_logp
            )
            nll_each = -per_row / sub_rows.rw_target_len
            nll = _per_problem_mean(nll_each, sub_rows.rw_problem, m)
            kl_logp = torch.log_softmax(kl_logits.float(), dim=-1)
            if kl_init is None:  # first step: every request active, delta = 0
                if rows.gain is None:  # nothing is added yet: these are the unedited distributions
                    kl_init = kl_logp.detach().clone()
                else:  # at delta = 0 the applied change is gain * offset: read the unedited model apart
                    with torch.no_grad():
                        zero = torch.zeros(len(rows.ids), d.shape[1], device=device)
                        _, kl_clean = forward(rows, prefix, zero, batch)
                    kl_init = torch.log_softmax(kl_clean.float(), dim=-1)
            kl_ref = kl_init[torch.isin(rows.kl_problem, active)]
            kl_each = (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)  # = F.kl_div(init, cur, log_target=True)
            kl = hparams.kl_factor * _per_problem_mean(kl_each, sub_rows.kl_problem, m)
            wd = hparams.v_weight_decay * (d.norm(dim=1) / target_init[active].norm(dim=1) ** 2)
            total = nll + kl + wd
            avg_prob = _per_problem_mean(torch.exp(-nll_each).detach(), sub_rows.rw_problem, m)
            for j, i in enumerate(active.tolist()):
                history[i].append(
                    {
                        "total": float(total[j].detach()),
                        "nll": float(nll[j].detach()),
                        "kl": float(kl[j].detach()),
                        "wd": float(wd[j].detach()),
                        "avg_prob": float(avg_prob[j]),
                    }
                )
            stage.advance(1, loss=float(total.detach().mean()))
            finished = total.detach() < hparams.early_stop_loss
            done[active[finished]] = True
            if bool(done.all()) or it == hparams.v_num_grad_steps - 1:
                break
            total[~finished].sum().backward()
            kept = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                delta[done] = kept
                norms = delta.norm(dim=1)
                over = norms > max_norm
                delta[over] = delta[over] * (max_norm[over] / norms[over])[:, None]
            active = (~done).nonzero().squeeze(1)
    log.debug("value optimisation: %d problems, %d steps", n, steps)
    result = ValueResult(target_init=target_init, delta=delta.detach(), steps=steps, losses=history)
    if value_site is None:
        return result
    v0 = target_init if value_site == site else prefix.value_at_lookup.to(device)[rows.first_rows].float()
    result.value_norms = (v0 + result.delta).norm(dim=1)
    if anchored:
        result.delta, result.anchor_skipped = anchor_value_norms(
            v0, result.delta, hparams.value_norm_anchor, hparams.value_norm_skip_factor
        )
        for i in range(n):
            history[i][-1].update(
                value_norm=float(result.value_norms[i]), anchor_skipped=float(result.anchor_skipped[i])
            )
        if bool(result.anchor_skipped.any()):
            log.warning(
                "NAS: %d of %d edits dropped: their value norm exceeds %g x the anchor %g",
                int(result.anchor_skipped.sum()), n, hparams.value_norm_skip_factor, hparams.value_norm_anchor,
            )  # fmt: skip
    return result


def _value_site(arch: ArchSpec, site: str, layer: int) -> str:
    """The module whose output NAS anchors: the site itself when it is the MLP's output projection
    (ROME's v*), else the MLP of block ``layer`` (MEMIT's z is the block's output; v* = v₀ + δ is its MLP's)."""
    return site if site == arch.rewrite_at(layer) else arch.mlp_at(layer)


def anchor_value_norms(
    v0: torch.Tensor, delta: torch.Tensor, anchor: float, skip_factor: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NAS on a batch: the deltas (n, d) that make each v* = v₀ + δ exactly ``anchor`` long, and which edits
    were dropped (δ = 0) because |v*| > ``skip_factor`` · ``anchor`` (None: none is dropped).

    The official rule (``scale_vector_to_norm``): v* · anchor / |v*|, both up and down; a zero v* is left as is.
    """
    v_star = v0 + delta
    norms = v_star.norm(dim=1)
    scale = torch.where(norms > 0, anchor / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))
    skipped = norms > skip_factor * anchor if skip_factor is not None else torch.zeros_like(norms, dtype=torch.bool)
    anchored = v_star * scale[:, None] - v0
    return torch.where(skipped[:, None], torch.zeros_like(delta), anchored), skipped


def upper_trimmed_mean(values: list[float], upper_quantile: float) -> tuple[float, int]:
    """The mean without the largest ⌊(1 − upper_quantile)·n⌋ values (official ``_upper_trimmed_mean``),
    and how many were left out."""
    dropped = math.floor((1 - upper_quantile) * len(values))  # < n, as upper_quantile > 0
    kept = sorted(values)[: len(values) - dropped]
    return sum(kept) / len(kept), dropped


@dataclass
class ReferenceNorm:
    """NAS's anchor for one layer: the upper-trimmed mean of the solved |v*| of a reference sample."""

    anchor: float
    norms: list[float]  # every solved |v*|, in request order
    dropped: int  # the largest norms left out of the mean
    refused: int  # requests that could not be posed (e.g. subject not found in the prompt)


def reference_value_norm(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: ValueOptimizationParams,
    *,
    layer: int,
    upper_quantile: float = 0.95,
    batch_size: int = 16,
    progress: Progress | bool | None = None,
) -> ReferenceNorm:
    """NAS's anchor at ``layer``, measured on ``model`` (which must be the unedited model).

    As the official ``get_or_compute_mean_vstar_norm``: each request's δ is optimised at the output of block
    ``layer`` (MEMIT's z) on its bare prompt alone (no context templates) with the KL prompt, v* = v₀ + δ
    (v₀: that block's MLP output), and the anchor is the mean |v*| without the largest
    ⌊(1 − ``upper_quantile``)·n⌋ norms. The official sample is 1,000 CounterFact rewrites (seed 0) with the
    model's MEMIT settings, the same anchor serving ROME at its layer; pass such requests and settings.
    Deviations: requests that stop early leave their batch one by one (official: a batch stops as one, on its
    mean loss), and requests that cannot be posed are counted and left out instead of failing the run.
    """
    if not requests:
        raise FactEditError("reference_value_norm needs at least one request")
    if not 0 < upper_quantile <= 1:
        raise FactEditError(f"upper_quantile must be in (0, 1], got {upper_quantile!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FactEditError(f"batch_size must be a whole number of at least 1 (got {batch_size!r})")
    check_layer(model, layer)
    arch = arch_for(model)
    fact_token = getattr(hparams, "fact_token", "subject_last")
    plain = hparams.model_copy(update={"value_norm_anchor": None})  # the anchor is measured without NAS
    problems = []
    for request in requests:
        try:
            problems.append(build_value_problem(tok, request, ["{}"], fact_token))
        except FactEditError as exc:
            log.info("NAS reference: %r left out: %s", request.text, exc)
    if not problems:
        raise FactEditError(f"none of the {len(requests)} reference requests can be posed")
    stage = as_progress(progress).stage("NAS reference norms", total=len(problems), unit="req")
    norms: list[float] = []
    with stage:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            result = optimize_values(
                model, arch, chunk, site=arch.block(layer), layer=layer, hparams=plain, pad=pad_id(tok),
                report_value_norms=True,
            )  # fmt: skip
            norms.extend(float(x) for x in result.value_norms)
            stage.advance(len(chunk))
    anchor, dropped = upper_trimmed_mean(norms, upper_quantile)
    log.info("NAS anchor at layer %d: %.4f (%d norms, %d largest left out)", layer, anchor, len(norms), dropped)
    return ReferenceNorm(anchor=anchor, norms=norms, dropped=dropped, refused=len(requests) - len(problems))


def _plain_forward(model, arch, site, rows: _Rows, injected, pad):
    """The official computation: every prompt, every layer, logits everywhere (returned on delta's device).

    ``injected`` (B, d): what is added at each row's lookup.
    """
    ids, mask = pad_right(rows.ids, pad, input_device(model))
    b = torch.arange(len(rows.ids), device=injected.device)

    def add_delta(out: torch.Tensor, name: str) -> torch.Tensor:
        where = (b.to(out.device), rows.lookup.to(out.device))
        return out.index_put(where, injected.to(out.device, out.dtype), accumulate=True)

    with Trace(model, site, retain_output=False, edit_output=add_delta):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    at = logits.device
    rw = logits[rows.rw_rows.to(at), rows.rw_pos.to(at)]
    kl = logits[rows.kl_rows.to(at), rows.lookup[rows.kl_rows].to(at)]
    return rw.to(injected.device), kl.to(injected.device)


def _live_blocks(model, arch: ArchSpec, site: str, layer: int, rows: _Rows) -> LiveBlocks | None:
    """The live runner for the blocks above ``layer``, where the change enters the residual stream as is.

    ``site`` must be the block's output (MEMIT's z) or its MLP's output projection (ROME's v*) in a family the
    runner serves (no norm after the MLP), so that the input of block ``layer + 1`` is its unedited value plus
    what is injected at the lookup; anything else keeps the model's own forward."""
    if site not in (arch.block(layer), arch.rewrite_at(layer)):
        return None
    max_position = max(len(ids) for ids in rows.ids)
    return LiveBlocks.for_model(model, arch, layer + 1, max_position)


def _read_positions(rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, live position) of every vector the loss reads: the target tokens' predictors, then the KL lookups."""
    rw_live = rows.rw_pos - rows.lookup[rows.rw_rows]
    return torch.cat([rows.rw_rows, rows.kl_rows]), torch.cat([rw_live, torch.zeros_like(rows.kl_rows)])


def _live_batch(live: LiveBlocks, prefix: _PrefixCache, rows: _Rows, dtype: torch.dtype) -> LiveBatch:
    return live.prepare(
        prefix.kv, prefix.prefix_ok, prefix.suffix_ok, prefix.position_ids, *_read_positions(rows), dtype
    )


def _live_forward(model, arch, live: LiveBlocks, batch: LiveBatch, prefix: _PrefixCache, rows: _Rows, injected):
    """The fast path's arithmetic through :class:`LiveBlocks`: blocks above the edited one, live tokens only."""
    start = prefix.live_input
    hidden = torch.cat([start[:, :1] + injected.to(start.device, start.dtype)[:, None], start[:, 1:]], dim=1)
    logits = lm_logits(model, arch, live.run(batch, hidden)).to(injected.device)
    return logits[: len(rows.rw_rows)], logits[len(rows.rw_rows) :]


def _fast_forward(model, arch, site, rows: _Rows, prefix: _PrefixCache, injected):
    """Only the edited block and above, only from the lookup token on, logits only where read."""

    def add_delta(out: torch.Tensor, name: str) -> torch.Tensor:
        first = out[:, :1] + injected.to(out.device, out.dtype)[:, None]
        return torch.cat([first, out[:, 1:]], dim=1)

    with (
        known_blocks(model, arch, prefix.layer, prefix.below),
        Trace(model, site, retain_output=False, edit_output=add_delta),
        Trace(model, arch.final_norm, retain_output=True, detach=False, stop=True) as final,
    ):
        model(
            input_ids=prefix.suffix_ids,
            attention_mask=prefix.mask,
            position_ids=prefix.position_ids,
            cache=prefix.new_cache(),
            use_cache=True,
        )
    hidden = final.output
    at = hidden.device
    rw_hidden = hidden[rows.rw_rows.to(at), (rows.rw_pos - rows.lookup[rows.rw_rows]).to(at)]
    kl_hidden = hidden[rows.kl_rows.to(at), 0]
    logits = lm_logits(model, arch, torch.cat([rw_hidden, kl_hidden])).to(injected.device)
    return logits[: len(rows.rw_rows)], logits[len(rows.rw_rows) :]
