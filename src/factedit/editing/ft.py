"""FT and FT-L baselines (ROME paper, §4; kmeng01/rome ``baselines/ft``): fine-tune one weight.

The weight is the architecture's rewrite weight (the MLP output projection ROME edits),
at ROME's layer by default. Adam (``lr``, ``weight_decay``) runs for up to ``num_steps`` steps
on the edit prompt; a step is skipped once the loss is below ``early_stop_loss`` and the loop
stops. FT-L additionally clamps every entry of the change to ``[-norm_constraint,
norm_constraint]`` after each step (an L∞ bound). The weight is trained through
``torch.func.functional_call`` on a float32 copy, so the model itself is never modified;
the result is a :class:`Patch` with a dense delta.

``objective='prompt_last'`` is ROME's loss: the log-probabilities of *all* target tokens read
from the prompt's last position (exact for one-token targets). ``'target_new'`` is the
teacher-forced NLL of the target tokens (EasyEdit's alternative).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams, Layers
from factedit.editing.patch import Patch, PatchEntry
from factedit.editing.requests import EditRequest
from factedit.editing.result import EditResult, converged_from_history
from factedit.errors import FactEditError
from factedit.hooks import Trace, frozen
from factedit.models.architectures import arch_for, get_parameter, math_shape, weight_to_math
from factedit.models.fingerprint import model_fingerprint, tensor_sha256
from factedit.models.placement import input_device, require_resident
from factedit.models.runtime import lm_logits
from factedit.progress import Progress, as_progress
from factedit.text import pad_id, pad_right, target_ids
from factedit.version import __version__

log = logging.getLogger(__name__)


class FTHyperParams(HyperParams):
    """ROME's FT settings (``hparams/FT``): lr 5e-4, 25 steps, no weight decay, no norm constraint."""

    layers: Layers
    num_steps: int = Field(25, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    norm_constraint: float | None = Field(None, gt=0)  # L∞ bound on the change (FT-L); None = unconstrained
    early_stop_loss: float = Field(1e-2, ge=0)
    batch_size: int = Field(128, ge=1)
    objective: Literal["prompt_last", "target_new"] = "prompt_last"

    @classmethod
    def method(cls) -> str:
        return "ft"


class FTLHyperParams(FTHyperParams):
    """FT-L: the same fine-tuning with an L∞ constraint (ROME's FT+L: ``norm_constraint`` 5e-4)."""

    norm_constraint: float | None = Field(5e-4, gt=0)

    @classmethod
    def method(cls) -> str:
        return "ft-l"


@dataclass
class FTResult:
    """Loss per step, steps taken and timings (kept in the patch's ``info`` too)."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    max_abs_delta: dict[str, float] = field(default_factory=dict)


def _batches(model, tok, requests: Sequence[EditRequest], hp: FTHyperParams):
    """Per chunk of requests: right-padded ids, mask, and (row, position, token) of every target token,
    on the embedding's device (:func:`_request_losses` moves them to where it reads)."""
    device = input_device(model)
    out = []
    for lo in range(0, len(requests), hp.batch_size):
        chunk = requests[lo : lo + hp.batch_size]
        seqs, rows, pos, toks, owner = [], [], [], [], []
        for r, req in enumerate(chunk):
            prompt = tok(req.text)["input_ids"]
            target = target_ids(tok, req.text, req.new_text)
            if hp.objective == "prompt_last":
                seqs.append(prompt)
                positions = [len(prompt) - 1] * len(target)
            else:
                seqs.append(prompt + target[:-1])
                positions = list(range(len(prompt) - 1, len(prompt) - 1 + len(target)))
            rows += [r] * len(target)
            pos += positions
            toks += target
            owner += [r] * len(target)
        ids, mask = pad_right(seqs, pad_id(tok), device)

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        out.append((ids, mask, t(rows), t(pos), t(toks), t(owner), len(chunk)))
    return out


def _request_losses(model, arch, final_hidden, rows, pos, toks, owner, n) -> torch.Tensor:
    """Per request: mean negative log-probability of its target tokens read at ``(rows, pos)`` (on the LM
    head's device)."""
    at = final_hidden.device
    logp = torch.log_softmax(lm_logits(model, arch, final_hidden[rows.to(at), pos.to(at)]).float(), dim=-1)
    toks, owner = toks.to(logp.device), owner.to(logp.device)
    token_logp = logp.gather(1, toks[:, None]).squeeze(1)
    per_req = torch.zeros(n, device=token_logp.device).index_add(0, owner, token_logp)
    counts = torch.zeros(n, device=token_logp.device).index_add(0, owner, torch.ones_like(token_logp))
    return -per_req / counts


def _ft_patch(
    model,
    arch,
    hp: FTHyperParams,
    base_fp: str,
    reqs: Sequence[EditRequest],
    deltas: dict[str, torch.Tensor],
    result: FTResult,
    info: dict | None = None,
    shas: dict[str, str] | None = None,
) -> Patch:
    """The dense patch of one FT edit: ``deltas`` by weight name, in the (out, in) view
    (``shas``: the weights' hashes, when already known)."""
    entries = []
    for name, dense in deltas.items():
        param = get_parameter(model, name)
        result.max_abs_delta[name] = float(dense.abs().max())
        sha = shas[name] if shas else tensor_sha256(param)
        entries.append(
            PatchEntry(
                name=name,
                shape=tuple(param.shape),
                transposed=arch.conv1d,
                dense=dense.contiguous().cpu(),
                base_sha256=sha,
            )
        )
    return Patch.for_model(
        model,
        method="ft-l" if hp.norm_constraint is not None else "ft",
        entries=entries,
        base_fingerprint=base_fp,
        requests=[r.to_dict() for r in reqs],
        hparams=hp.model_dump(mode="json"),
        info={
            "losses": result.losses,
            "steps": result.steps,
            "seconds": result.seconds,
            "max_abs_delta": result.max_abs_delta,
            **(info or {}),
        },
        version=__version__,
    )


def compute_ft(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: EditRequest | Sequence[EditRequest],
    hparams: FTHyperParams | None = None,
    *,
    progress: Progress | bool | None = None,
) -> EditResult:
    """Fine-tune the rewrite weight(s) on the request(s); ``result.patch`` is the change as a dense
    :class:`Patch`, ``result.details[0]`` the :class:`FTResult`. The model is left unchanged."""
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not reqs:
        raise FactEditError("no edit requests")
    hp = hparams or FTHyperParams.for_model(model)
    hp.check_model(model)
    arch = arch_for(model)
    names = [arch.rewrite_weight_at(layer) for layer in hp.layers]
    require_resident(model, names, f"fine-tune ({hp.method()})")
    base_fp = model_fingerprint(model)
    originals = {name: get_parameter(model, name) for name in names}
    trained = {name: p.detach().float().clone().requires_grad_(True) for name, p in originals.items()}
    opt = torch.optim.Adam(list(trained.values()), lr=hp.lr, weight_decay=hp.weight_decay)
    batches = _batches(model, tok, reqs, hp)
    result = FTResult()
    started = time.perf_counter()

    def loss_of(ids, mask, rows, pos, toks, owner, n) -> torch.Tensor:
        params = {name: w.to(originals[name].dtype) for name, w in trained.items()}
        with Trace(model, arch.final_norm, retain_output=True, detach=False, stop=True) as fin:
            functional_call(
                model,
                params,
                args=(),
                kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False},
                strict=False,
            )
        return _request_losses(model, arch, fin.output, rows, pos, toks, owner, n).mean()

    bar = as_progress(progress).stage(hp.method(), total=hp.num_steps, unit="step")
    with frozen(model), bar:
        for _ in range(hp.num_steps):
            total, count = 0.0, 0
            for batch in batches:
                opt.zero_grad()
                loss = loss_of(*batch)
                total += float(loss.detach()) * batch[-1]
                count += batch[-1]
                if float(loss.detach()) >= hp.early_stop_loss:
                    loss.backward()
                    opt.step()
                    result.steps += 1
                if hp.norm_constraint is not None:
                    eps = hp.norm_constraint
                    with torch.no_grad():
                        for name, w in trained.items():
                            base = originals[name].detach().float()
                            w.copy_(torch.clamp(w, min=base - eps, max=base + eps))
            result.losses.append(total / count)
            bar.advance(1, loss=result.losses[-1])
            if result.losses[-1] < hp.early_stop_loss:
                break
    result.seconds = time.perf_counter() - started

    deltas = {}
    for name, w in trained.items():
        delta = w.detach() - originals[name].detach().float()
        if hp.norm_constraint is not None:  # exact bound despite float rounding of the clamp limits
            delta = delta.clamp(-hp.norm_constraint, hp.norm_constraint)
        deltas[name] = weight_to_math(delta, arch)  # stored in the (out, in) view
    patch = _ft_patch(model, arch, hp, base_fp, reqs, deltas, result)
    log.debug("%s: %d steps, final loss %.4g", patch.method, result.steps, result.losses[-1])
    return _ft_result(patch, reqs, hp, result)


def _ft_result(patch: Patch, reqs: list[EditRequest], hp: FTHyperParams, result: FTResult) -> EditResult:
    history = [{"total": loss, "avg_prob": math.exp(-loss)} for loss in result.losses]
    converged = converged_from_history(history, hp.early_stop_loss)
    return EditResult(
        patch=patch,
        requests=list(reqs),
        converged=[converged] * len(reqs),
        losses=[history] * len(reqs),
        timings={"ft": result.seconds},
        details=[result],
    )


def compute_ft_each(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: FTHyperParams | None = None,
) -> list[EditResult]:
    """Independent FT edits of several requests, each as :func:`compute_ft` would make it alone.

    Why: one short prompt leaves the CPU waiting on memory (every weight is read for ten tokens), so
    B prompts in one forward cost little more than one. Request b trains its own change ΔW_b,
    added through a hook on the rewrite module (y_b += x_b ΔW_bᵀ); the losses are summed and Adam
    is element-wise, so each change follows the path it would follow alone (up to float rounding).
    A request stops at the early-stop loss, as alone. Needs ``weight_decay`` 0: Adam's L2 term
    acts on W, which this formulation does not hold.
    """
    reqs = list(requests)
    if not reqs:
        raise FactEditError("no edit requests")
    hp = hparams or FTHyperParams.for_model(model)
    hp.check_model(model)
    if hp.weight_decay:
        raise FactEditError("compute_ft_each needs weight_decay 0; use compute_ft for each request")
    if next(model.parameters()).dtype != torch.float32:
        # alone, the change is rounded into the half-precision weight at every step; here it would not be
        raise FactEditError("compute_ft_each needs a float32 model; use compute_ft for each request")
    arch = arch_for(model)
    require_resident(model, [arch.rewrite_weight_at(layer) for layer in hp.layers], f"fine-tune ({hp.method()})")
    base_fp = model_fingerprint(model)
    ids, mask, rows, pos, toks, owner, n = _batches(model, tok, reqs, hp.replace(batch_size=len(reqs)))[0]
    params = {layer: get_parameter(model, arch.rewrite_weight_at(layer)) for layer in hp.layers}
    # changes in the (out, in) view, one per request
    deltas = {
        layer: torch.zeros((n, *math_shape(p, arch)), dtype=torch.float32, device=p.device, requires_grad=True)
        for layer, p in params.items()
    }
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.lr)
    active = torch.ones(n, dtype=torch.bool)  # per request, on the CPU: each use moves it to its tensor's device
    results = [FTResult() for _ in reqs]
    started = time.perf_counter()

    def add_change(layer: int):
        def edit(out: torch.Tensor, name: str) -> torch.Tensor:
            change = torch.einsum("bti,boi->bto", traces[layer].input.to(deltas[layer].device).float(), deltas[layer])
            return out + change.to(out.device, out.dtype)

        return edit

    traces = {
        layer: Trace(
            model,
            arch.rewrite_at(layer),
            retain_input=True,
            retain_output=False,
            detach=False,
            edit_output=add_change(layer),
        )
        for layer in hp.layers
    }
    try:
        with frozen(model):
            for _ in range(hp.num_steps):
                opt.zero_grad()
                with Trace(model, arch.final_norm, retain_output=True, detach=False, stop=True) as fin:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                losses = _request_losses(model, arch, fin.output, rows, pos, toks, owner, n)
                for b in active.nonzero().squeeze(1).tolist():
                    results[b].losses.append(float(losses[b].detach()))
                stepping = active & (losses.detach() >= hp.early_stop_loss).cpu()
                if bool(stepping.any()):
                    losses[stepping.to(losses.device)].sum().backward()
                    kept = {layer: d.detach()[~stepping.to(d.device)].clone() for layer, d in deltas.items()}
                    opt.step()
                    with torch.no_grad():
                        for layer, d in deltas.items():
                            d[~stepping.to(d.device)] = kept[
                                layer
                            ]  # finished requests do not move (Adam's momentum would)
                            if hp.norm_constraint is not None:
                                d.clamp_(-hp.norm_constraint, hp.norm_constraint)
                    for b in stepping.nonzero().squeeze(1).tolist():
                        results[b].steps += 1
                active = stepping
                if not bool(active.any()):
                    break
    finally:
        for trace in traces.values():
            trace.close()
    seconds = time.perf_counter() - started

    shas = {arch.rewrite_weight_at(layer): tensor_sha256(p) for layer, p in params.items()}
    out = []
    for b, req in enumerate(reqs):
        result = results[b]
        result.seconds = seconds / n
        changes = {arch.rewrite_weight_at(layer): d[b].detach().clone() for layer, d in deltas.items()}
        patch = _ft_patch(model, arch, hp, base_fp, [req], changes, result, {"computed_with": n}, shas)
        out.append(_ft_result(patch, [req], hp, result))
    return out


def apply_ft(model: nn.Module, tok: PreTrainedTokenizerBase, requests, hparams: FTHyperParams | None = None, **kwargs):
    """Compute an FT/FT-L edit and apply it; returns the handle (``.revert()`` undoes it bit-exact)."""
    return compute_ft(model, tok, requests, hparams, **kwargs).patch.apply(model)
