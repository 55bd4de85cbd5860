"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2022, arXiv 2210.07229), as in kmeng01/memit.

1. z: for every request, the last critical layer's block output at the subject that makes
   the model say the target (the shared value optimisation, batched across requests).
2. For each critical layer l_i in order: keys K (template-averaged rewrite-module inputs),
   residual R = z − (current last-layer output), spread as R / (n_layers − i), and
   ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ solved in float64; later layers see earlier updates.
   Where a norm follows the MLP (Gemma 3's post-feedforward norm; official MEMIT has no such model), R is
   first mapped through it to the MLP output change that moves the residual by R
   (:func:`~factedit.models.runtime.mlp_output_change`): without that, ΔW k = R changes the residual by
   norm(m + R) − norm(m), not R.
The statistics C, keys, templates and value optimisation are the core's, shared with ROME.

Several processes (every rank of a torchrun job calling :func:`compute_memit` with the same requests,
:mod:`factedit.distributed`): the z chunks (``batch_size`` requests each, the same chunks as one process)
are shared out by rank, each rank optimising every ``world``-th chunk (and keeping it in ``z_cache``), and
gathered in order; the statistics are computed together. At each layer the keys and the current values
are read in forward batches of ``key_batch_size`` prompts (the batches one process runs), shared out the
same way and gathered in order; rank 0 alone solves for ΔW and sends the patch entry to the others, and
every rank applies that entry before the next layer's keys, so all ranks hold the same weights throughout.
Every rank returns the same patch, equal to one process's (bit for bit at the same statistics and thread
count: docs/distributed.md); the caller writes it once (rank 0).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit import distributed
from factedit.editing.hparams import MEMITHyperParams
from factedit.editing.keys import lookup_position, mean_keys, module_inputs_at
from factedit.editing.patch import Patch, PatchEntry
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult, converged_from_history
from factedit.editing.templates import check_templates, template_group_sizes, template_weights
from factedit.editing.values import build_value_problem, optimize_values
from factedit.errors import FactEditError
from factedit.integrity import load_signed, save_signed
from factedit.models.architectures import arch_for, get_parameter
from factedit.models.fingerprint import model_fingerprint, tensor_sha256
from factedit.models.placement import module_device, require_resident
from factedit.models.runtime import mlp_output_change
from factedit.paths import atomic_write_bytes
from factedit.progress import Progress, as_progress
from factedit.text import encode_with_subject, pad_id

log = logging.getLogger(__name__)


def key_text(request: EditRequest, fact_token: str = "subject_last") -> str:
    """The text a request's keys are read from: up to the subject's end (or the whole prompt).

    Two requests with the same key text get the same key at every layer, so one batch cannot give
    them different values; this is what makes two requests conflict.
    """
    if fact_token == "subject_last":
        return request.prompt[: request.prompt.index("{}")] + request.subject
    return request.text


def check_batch(requests: Sequence[EditRequest], fact_token: str = "subject_last") -> list[EditRequest]:
    """Refuse empty batches and conflicting requests; drop exact duplicates (one key, one value).

    Rule: requests whose keys are read from the same text (``key_text``: e.g. ``"{} is in"`` and
    ``"{} was founded in"`` with the same subject) must ask for the same target.
    """
    if not requests:
        raise FactEditError("empty batch: give at least one request")
    by_key: dict[str, EditRequest] = {}
    seen: set[tuple[str, str, str]] = set()
    unique, conflicts = [], []
    for r in requests:
        exact = (r.prompt, r.subject, r.target_new.strip())
        if exact in seen:
            continue
        first = by_key.setdefault(key_text(r, fact_token), r)
        if first.target_new.strip() != r.target_new.strip():
            conflicts.append(f"{r.text!r} -> {r.target_new!r} conflicts with {first.text!r} -> {first.target_new!r}")
            continue
        seen.add(exact)
        unique.append(r)
    if conflicts:
        raise FactEditError(
            "conflicting requests (same subject in the same leading text, different targets; their keys are "
            "equal, so one batch cannot hold both): " + "; ".join(conflicts)
        )
    return unique


class KeySolver(Protocol):
    """Turns keys K (d_in, n) at a layer into A (d_in, n) with ΔW = R Aᵀ; MEMIT's is (λC + KKᵀ)⁻¹K."""

    def __call__(self, layer: int, keys: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class KeyObserver(Protocol):
    """A solver that keeps state from the keys it solves for (AlphaEdit's K Kᵀ of a sequence). Under torchrun
    only rank 0 solves; the other ranks show it the same keys instead, so every rank holds the same state."""

    def observe(self, layer: int, keys: torch.Tensor) -> None: ...


def memit_solver(second_moment: dict[int, torch.Tensor], weight: float) -> KeySolver:
    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        moment = second_moment[layer].to(keys.device).double()  # C moved to the layer's device
        return torch.linalg.solve(weight * moment + keys @ keys.T, keys)

    return solve


def _layer_entry(
    solver: KeySolver,
    layer: int,
    keys: torch.Tensor,
    resid: torch.Tensor,
    name: str,
    weight: torch.Tensor,
    transposed: bool,
) -> PatchEntry:
    """One layer's ΔW = R Aᵀ (keys ``(n, d_in)``, residuals ``(n, d_out)``), low rank while that is smaller."""
    adj = solver(layer, keys.double().T)  # (d_in, n), on the layer's device (keys and C are there)
    left, right = resid.T.to(adj.device), adj.T  # ΔW (out, in) = resid.T @ adj.T
    out_dim, in_dim = left.shape[0], right.shape[1]
    dense = left.shape[1] > min(out_dim, in_dim) // 2
    entry = PatchEntry(
        name=name,
        shape=tuple(weight.shape),
        transposed=transposed,
        base_sha256=tensor_sha256(weight),
        dense=(left @ right).float().cpu() if dense else None,
        left=None if dense else left.float().cpu(),
        right=None if dense else right.float().cpu(),
    )
    log.info("layer %d: |resid| %.3f, |ΔW| %.3f", layer, float(resid.norm(dim=1).mean()), float(entry.delta().norm()))
    return entry


def _alone(fn: functools.partial[PatchEntry]) -> PatchEntry:
    """Run ``fn`` on this rank alone: anything it would share (statistics a solver looks up) is not waited for
    by ranks that are not there."""
    with distributed.independent():
        return fn()


def _same_batch_on_every_rank(
    fingerprint: str, hp: MEMITHyperParams, requests: Sequence[EditRequest], templates: list[str], method: str
) -> list[str]:
    """Under torchrun: refuse (on every rank, in one line) a rank given other weights, requests or settings
    than rank 0; return rank 0's context templates, which every rank then uses."""
    mine = {
        "weights": fingerprint,
        "requests": hashlib.sha256(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()).hexdigest(),
        "hyper-parameters": json.dumps(hp.model_dump(mode="json"), sort_keys=True),
    }
    views = distributed.all_gather_objects((mine, templates), f"comparing the ranks' {method} batches")
    for other, (view, _) in enumerate(views):
        differ = [key for key in mine if view[key] != views[0][0][key]]
        if differ:
            raise FactEditError(
                f"rank {other} computes another {method} batch than rank 0 ({', '.join(differ)} differ): every "
                "rank must edit the same model with the same requests and settings"
            )
    return list(views[0][1])


def compute_memit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: MEMITHyperParams | None = None,
    *,
    second_moment: dict[int, torch.Tensor] | None = None,
    templates: list[str] | None = None,
    corpus: str | None = None,
    resources: EditResources | None = None,
    progress: Progress | bool | None = None,
    solver: KeySolver | None = None,
    method: str = "memit",
    z_cache: str | Path | None = None,
    key_batch_size: int = 64,
) -> EditResult:
    """Compute one MEMIT patch for a whole batch of requests; the model is left unchanged.

    ``solver`` replaces MEMIT's least-squares step (AlphaEdit passes its null-space projected one).
    ``z_cache``: a folder where each chunk's target vectors are kept (keyed by the weights, the
    requests, the templates and the hyper-parameters), so an interrupted 1,000-edit batch does
    not redo the z optimisation, by far its longest part.
    ``key_batch_size``: prompts per forward pass when reading keys (lower it if that pass runs out of
    memory); under torchrun, the unit of work shared out between the ranks.
    """
    if isinstance(key_batch_size, bool) or not isinstance(key_batch_size, int) or key_batch_size < 1:
        raise FactEditError(f"key_batch_size must be a whole number of at least 1 (got {key_batch_size!r})")
    hp = hparams or MEMITHyperParams.for_model(model)
    hp.check_model(model)
    arch = arch_for(model)
    require_resident(model, [arch.rewrite_weight_at(layer) for layer in hp.layers], f"edit with {method}")
    requests = check_batch(list(requests), hp.fact_token)
    progress = as_progress(progress)
    for r in requests:  # bad subjects/targets refused before statistics or templates are made
        build_value_problem(tok, r, ["{}"], hp.fact_token)
    base_fp = model_fingerprint(model)
    distributed.init(module_device(model, arch.block(hp.layers[-1])))  # under torchrun: join the ranks; else nothing
    resources = resources or EditResources(model, tok, corpus=corpus)
    if templates is None:
        templates = resources.templates(hp.template_spec, progress)
    if distributed.collective():  # rank 0's templates for all (sampled text could differ between machines)
        templates = _same_batch_on_every_rank(base_fp, hp, requests, templates, method)
    check_templates(templates)
    groups = template_group_sizes(hp.context_template_length_params, hp.template_starts)
    groups = groups if templates[0] == "{}" else None  # given templates not laid out like generated ones
    problems, failures = [], []
    for r in requests:  # every request is checked before anything is computed; all failures reported together
        try:
            problems.append(build_value_problem(tok, r, templates, hp.fact_token))
        except FactEditError as exc:
            failures.append(f"{r.text!r}: {exc}")
    if failures:
        raise FactEditError(
            f"{len(failures)} of {len(requests)} requests cannot be edited; nothing was changed: " + "; ".join(failures)
        )
    second_moment = resources.moments_with(hp, second_moment, progress)
    solver = solver or memit_solver(second_moment, hp.mom2_update_weight)
    timings: dict[str, float] = {}
    z_layer = hp.layers[-1]

    started = time.perf_counter()
    zs = []
    histories: list[list[dict[str, float]]] = []
    starts = list(range(0, len(problems), hp.batch_size))
    sharded = distributed.collective()
    own = set(distributed.shard(starts)) if sharded else set(starts)
    z_stage = progress.stage(
        f"{method} z vectors" + (f" (rank {distributed.rank()} of {distributed.world_size()})" if sharded else ""),
        total=sum(len(problems[i : i + hp.batch_size]) for i in own),
        unit="req",
    )
    by_start: dict[int, tuple[torch.Tensor, list[list[dict[str, float]]]]] = {}
    for start in starts:
        if start not in own:
            continue
        chunk = problems[start : start + hp.batch_size]
        path = None
        if z_cache is not None:
            key = json.dumps(
                [
                    base_fp,
                    hp.model_dump(mode="json"),
                    templates,
                    [r.to_dict() for r in requests[start : start + hp.batch_size]],
                ],
                sort_keys=True,
            )
            path = Path(z_cache) / f"z_{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
            if path.is_file():  # checksummed: a damaged file is refused, naming it
                cached, _, _ = load_signed(path, f"MEMIT z cache file {path}", remedy="delete it to recompute it")
                z = cached.get("z")
                if z is None or z.ndim != 2 or z.shape[0] != len(chunk):
                    raise FactEditError(f"MEMIT z cache file {path} does not fit this chunk; delete it to recompute")
                # where optimised z's live
                by_start[start] = (
                    z.to(module_device(model, arch.block(z_layer))),
                    [[{"total": 0.0, "cached": 1.0}] for _ in chunk],
                )
                z_stage.advance(len(chunk))
                continue
        values = optimize_values(
            model, arch, chunk, site=arch.block(z_layer), layer=z_layer, hparams=hp, pad=pad_id(tok), progress=progress
        )
        z = values.targets
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, save_signed({"z": z}, {"format": "factedit-memit-z-v1"}))
        by_start[start] = (z, values.losses)
        z_stage.advance(len(chunk))
    z_stage.close()
    if sharded:  # every rank gets every chunk's z (and its losses), in order
        z_device = module_device(model, arch.block(z_layer))
        shared = distributed.all_gather_objects(
            {i: (z.cpu(), h) for i, (z, h) in by_start.items()}, f"gathering the {method} z vectors"
        )
        by_start = {i: (z.to(z_device), h) for part in shared for i, (z, h) in part.items()}
    for start in starts:
        zs.append(by_start[start][0])
        histories.extend(by_start[start][1])
    zs = torch.cat(zs)  # (n, d)
    timings["z"] = time.perf_counter() - started

    bare = [encode_with_subject(tok, r.prompt, r.subject) for r in requests]
    bare_pos = [lookup_position(b, hp.fact_token) for b in bare]
    weights_tw = template_weights(templates, groups)
    entries: list[PatchEntry] = []
    originals: dict[str, torch.Tensor] = {}
    timings["keys"] = timings["solve"] = 0.0
    name_z = arch.block(z_layer)
    try:
        for i, layer in enumerate(hp.layers):
            t0 = time.perf_counter()
            keys = mean_keys(  # (n, d_in)
                model, tok, arch, layer, requests, templates, weights_tw, hp.fact_token,
                batch_size=key_batch_size, shared=sharded,
            )  # fmt: skip
            post_norm = arch.mlp_post_norm_at(layer) is not None  # then the MLP's own output is needed too
            read = [arch.rewrite_at(layer), name_z] if post_norm else [name_z]
            outputs = module_inputs_at(
                model, read, [b.ids for b in bare], bare_pos,
                pad=pad_id(tok), batch_size=key_batch_size, output=True, shared=sharded,
            )  # fmt: skip
            cur = outputs[name_z]
            t1 = time.perf_counter()
            name = arch.rewrite_weight_at(layer)
            weight = get_parameter(model, name)
            resid = (zs - cur.float()).double() / (len(hp.layers) - i)  # (n, d_out): the residual's share
            if post_norm:  # the MLP output change that makes that residual change through the norm
                resid = mlp_output_change(model, arch, layer, outputs[arch.rewrite_at(layer)], resid).double()
            solve = functools.partial(_layer_entry, solver, layer, keys, resid, name, weight, arch.conv1d)
            if sharded:  # rank 0 solves; every rank applies its entry (the same weights for the next layer)
                entry = distributed.on_main(
                    functools.partial(_alone, solve), f"solving {method}'s update of layer {layer}"
                )
                if not distributed.is_main() and isinstance(solver, KeyObserver):
                    solver.observe(layer, keys.double().T)
            else:
                entry = solve()
            entries.append(entry)
            with torch.no_grad():
                originals.setdefault(name, weight.detach().clone())
                weight.copy_((weight.float() + entry.delta().to(weight.device)).to(weight.dtype))
            timings["keys"] += t1 - t0
            timings["solve"] += time.perf_counter() - t1
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                get_parameter(model, name).copy_(original)

    patch = Patch.for_model(
        model,
        method=method,
        entries=entries,
        base_fingerprint=base_fp,
        requests=[r.to_dict() for r in requests],
        hparams=hp.model_dump(mode="json"),
        info={"timings": timings, "templates": templates},
    )
    converged = [converged_from_history(h, hp.early_stop_loss) for h in histories]  # cached z: loss 0, converged
    return EditResult(patch=patch, requests=list(requests), converged=converged, losses=histories, timings=timings)
