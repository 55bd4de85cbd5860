"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu, Huang, Gu & Zhang, TMLR 2026,
arXiv 2505.14679), after the official code XiaojieGu/UltraEdit (``editor/ultraedit.py``, ``nets.py``
``RunningMeanStd``, ``config/editor/ultraedit.yaml``).

No value is optimised. Per batch ("turn"), one forward and one backward pass of the cross-entropy of the
new targets (teacher-forced, mean over the target tokens of ``batch_size`` requests) give, at every
edited module and every position that predicts a target token, the module's input k (the key) and the
gradient g of the loss with respect to its output. Then, per module:

1. **Lifelong normalisation.** The features z = [k ‖ g] of this turn are merged into running per-feature
   statistics (count, mean, sum of squared deviations) that persist across turns (:class:`UltraEditState`),
   and standardised with them: ẑ = (z − μ) / (σ + ε), split into k̂ and ĝ.
2. **Pseudo values.** v = −lr · ‖k̂‖² · ĝ: the output change of one normalised gradient step.
3. **Closed form.** ΔWᵀ = (KᵀK + L2 · I)⁻¹ Kᵀ V over the raw keys K (rows = target positions): the ridge
   regression that maps each key to its pseudo value.

All edited modules take their ΔW from the same pass on the model as it is, and the patch holds them all.
The statistics persist along a sequence: ``state.commit()`` once a batch's patch is applied keeps this turn's
rows; ``discard()`` forgets them. ``state_dict()`` / ``load_state_dict()`` save and resume them.

Shared with the core, not copied: the requests' tokenisation (:func:`~factedit.editing.values.build_value_problem`,
the ids the value optimisation trains on), the batch rule (:func:`~factedit.editing.memit.check_batch` with the
key at the last token), hooks (:mod:`factedit.hooks`), the LM head (:func:`~factedit.models.runtime.lm_logits`)
and the patch.

Deviations from the official code:
- The edited modules default to the rewrite modules of ``layers`` (the MLP output projection, as ROME/MEMIT;
  the official runs edit ``down_proj``/``fc_out`` on Mistral, GPT-J and Phi-4); ``modules="input"`` edits the
  MLP's input projections instead (``gate_proj`` and ``up_proj``, as the official Llama 3, Qwen2.5 and
  Gemma 3 runs; Phi-3's fused ``gate_up_proj``), which share one set of statistics as they share a shape.
- Running statistics: the batch's sum of squared deviations is merged exactly (Chan et al.); the official
  update adds n × the unbiased variance, which is NaN for a single row. As there, modules of the same weight
  shape share one set of statistics, σ = √(M₂ / (n − 1 + ε)) and ε is float32's machine epsilon; kept in
  float64 here.
- A turn whose statistics would hold fewer than two rows (one single-token edit on one layer from a fresh
  state) is refused: its standardised features, hence its update, would be zero (official: NaN).
- The solve is in float64; when the turn has fewer rows than the key has features it uses the same solution
  written as Vᵀ (KKᵀ + L2 I)⁻¹ K (push-through identity), stored as two low-rank factors.
- The official loss is over chunks of ``batch_size`` requests as here, but the official normalisation pass pads
  chunks of 128 rows with zeros and truncates them again: no effect on the result, not reproduced.
- ``converged`` per request: whether the edited model gives the new target a (geometric-mean) token
  probability of at least 0.5 on the prompt, measured with one more forward pass (the paper has no such test).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import UltraEditHyperParams
from factedit.editing.memit import check_batch
from factedit.editing.patch import Patch, PatchEntry
from factedit.editing.requests import EditRequest
from factedit.editing.result import CONVERGED_PROB, EditResult
from factedit.editing.values import ValueProblem, build_value_problem
from factedit.errors import FactEditError
from factedit.hooks import Trace, TraceDict, frozen
from factedit.models.architectures import ArchSpec, arch_for, get_parameter, math_shape
from factedit.models.fingerprint import model_fingerprint, tensor_sha256
from factedit.models.placement import input_device, module_device, require_resident
from factedit.models.runtime import lm_logits
from factedit.progress import Progress, as_progress
from factedit.text import pad_id, pad_right

log = logging.getLogger(__name__)

EPS = float(torch.finfo(torch.float32).eps)  # the official normaliser's ε (its features are float32)


@dataclass(frozen=True)
class RunningMoments:
    """Per-feature count, mean and sum of squared deviations of every row seen so far (float64, CPU)."""

    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, size: int) -> RunningMoments:
        zeros = torch.zeros(size, dtype=torch.float64)
        return cls(0.0, zeros, zeros.clone())

    def merged(self, rows: torch.Tensor) -> RunningMoments:
        """These statistics with ``rows`` (n, size) added (Chan et al.'s pairwise update)."""
        rows = rows.detach().double().cpu()
        n = float(rows.shape[0])
        if n == 0:
            return self
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        return RunningMoments(
            total, self.mean + delta * (n / total), self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        )

    def standardised(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows − μ) / (σ + ε), on the rows' device, float64."""
        mean = self.mean.to(rows.device)
        std = (self.m2.to(rows.device) / (self.count - 1 + EPS)).sqrt()
        return (rows.double() - mean) / (std + EPS)


def _statistics_key(in_features: int, out_features: int) -> str:
    """Modules of one weight shape share their statistics (as the official normaliser, keyed by shape)."""
    return f"{in_features}x{out_features}"


class UltraEditState:
    """UltraEdit's lifelong normalisation: running statistics of [key ‖ gradient] per weight shape."""

    def __init__(self) -> None:
        self.moments: dict[str, RunningMoments] = {}
        self._pending: dict[str, RunningMoments] = {}

    def rows(self, key: str) -> int:
        """How many feature rows the kept statistics of ``key`` hold."""
        moments = self.moments.get(key)
        return int(moments.count) if moments is not None else 0

    def updated(self, key: str, rows: torch.Tensor) -> RunningMoments:
        """The kept statistics of ``key`` with ``rows`` merged in, held as pending until :meth:`commit`."""
        base = self.moments.get(key) or RunningMoments.empty(rows.shape[1])
        if base.mean.numel() != rows.shape[1]:
            raise FactEditError(
                f"UltraEdit state for {key} holds {base.mean.numel()} features, not {rows.shape[1]}: "
                "it belongs to another model"
            )
        self._pending[key] = base.merged(rows)
        return self._pending[key]

    def commit(self) -> None:
        """The last batch was applied and stays: its rows join the running statistics."""
        self.moments.update(self._pending)
        self._pending.clear()

    def discard(self) -> None:
        """The last batch was not kept: forget its rows."""
        self._pending.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, m in self.moments.items():
            out[f"normaliser.{key}.count"] = torch.tensor([m.count], dtype=torch.float64)
            out[f"normaliser.{key}.mean"] = m.mean.contiguous()
            out[f"normaliser.{key}.m2"] = m.m2.contiguous()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            prefix, _, rest = name.partition(".")
            key, _, field = rest.rpartition(".")
            if prefix != "normaliser" or field not in ("count", "mean", "m2") or not key:
                raise FactEditError(f"not an UltraEdit state: unexpected tensor {name!r}")
            parts.setdefault(key, {})[field] = value.detach().double().cpu()
        moments = {}
        for key, p in parts.items():
            if set(p) != {"count", "mean", "m2"} or p["mean"].shape != p["m2"].shape or p["count"].numel() != 1:
                raise FactEditError(f"UltraEdit state for {key} is incomplete or inconsistent")
            moments[key] = RunningMoments(float(p["count"].item()), p["mean"], p["m2"])
        self.moments = moments
        self._pending.clear()


@dataclass
class _Turn:
    """This turn's keys and output gradients per edited module, and each request's target NLL."""

    keys: dict[str, list[torch.Tensor]]
    grads: dict[str, list[torch.Tensor]]
    nll: list[float]


def _target_positions(problems: Sequence[ValueProblem]) -> tuple[list[int], list[int], list[int], list[int]]:
    """(row, position, token, problem) of every target token: the position whose logits predict it."""
    rows, positions, tokens, owner = [], [], [], []
    for i, p in enumerate(problems):
        for j, token in enumerate(p.target):
            rows.append(i)
            positions.append(p.prompt_lengths[0] - 1 + j)
            tokens.append(token)
            owner.append(i)
    return rows, positions, tokens, owner


def _per_request_nll(token_nll: torch.Tensor, owner: list[int], n: int) -> list[float]:
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, torch.tensor(owner), token_nll.double().cpu())
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, torch.tensor(owner), torch.ones(len(owner)).double())
    return (sums / counts).tolist()


def _target_logits(
    model: nn.Module, arch: ArchSpec, ids: torch.Tensor, mask: torch.Tensor, rows: list[int], positions: list[int]
) -> torch.Tensor:
    """Logits at the target positions only: the forward stops at the final norm, the LM head runs there."""
    with Trace(model, arch.final_norm, retain_output=True, detach=False, stop=True) as final:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = final.output
    index = (torch.tensor(rows, device=hidden.device), torch.tensor(positions, device=hidden.device))
    return lm_logits(model, arch, hidden[index]).float()


def _gradients(
    model: nn.Module,
    arch: ArchSpec,
    names: list[str],
    problems: list[ValueProblem],
    hp: UltraEditHyperParams,
    pad: int,
    progress: Progress,
) -> _Turn:
    """Keys and output gradients at every target position, ``hp.batch_size`` requests per pass."""
    turn = _Turn({n: [] for n in names}, {n: [] for n in names}, [])
    homes = {name: module_device(model, name) for name in names}
    leaves: dict[str, torch.Tensor] = {}

    def observed(output: torch.Tensor, name: str) -> torch.Tensor:
        # a zero added to the output: its gradient is the output's, through every later module
        leaves[name] = torch.zeros_like(output, requires_grad=True)
        return output + leaves[name]

    stage = progress.stage("ultraedit gradients", total=len(problems), unit="req")
    with stage:
        for start in range(0, len(problems), hp.batch_size):
            chunk = problems[start : start + hp.batch_size]
            rows, positions, tokens, owner = _target_positions(chunk)
            ids, mask = pad_right([p.rewrite_prompts[0] for p in chunk], pad, input_device(model))
            leaves.clear()
            with torch.enable_grad(), frozen(model):
                with TraceDict(model, names, retain_input=True, retain_output=False, edit_output=observed) as tr:
                    logits = _target_logits(model, arch, ids, mask, rows, positions)
                target = torch.tensor(tokens, device=logits.device)
                token_nll = F.cross_entropy(logits, target, reduction="none")
                grads = torch.autograd.grad(token_nll.mean(), [leaves[n] for n in names])
            turn.nll.extend(_per_request_nll(token_nll.detach(), owner, len(chunk)))
            for name, grad in zip(names, grads, strict=True):
                home = homes[name]  # keys and gradients of a module live on its device
                key_in = tr[name].input
                at = (torch.tensor(rows, device=key_in.device), torch.tensor(positions, device=key_in.device))
                turn.keys[name].append(key_in[at].float().to(home))
                turn.grads[name].append(grad[(at[0].to(grad.device), at[1].to(grad.device))].float().to(home))
            stage.advance(len(chunk))
    return turn


@torch.no_grad()
def _nll_after(
    model: nn.Module,
    arch: ArchSpec,
    problems: list[ValueProblem],
    entries: list[PatchEntry],
    hp: UltraEditHyperParams,
    pad: int,
) -> list[float]:
    """Each request's target NLL with the update applied for the duration of the call."""
    originals: dict[str, torch.Tensor] = {}
    nll: list[float] = []
    try:
        for entry in entries:
            weight = get_parameter(model, entry.name)
            originals[entry.name] = weight.detach().clone()
            weight.copy_((weight.float() + entry.delta().to(weight.device)).to(weight.dtype))
        for start in range(0, len(problems), hp.batch_size):
            chunk = problems[start : start + hp.batch_size]
            rows, positions, tokens, owner = _target_positions(chunk)
            ids, mask = pad_right([p.rewrite_prompts[0] for p in chunk], pad, input_device(model))
            logits = _target_logits(model, arch, ids, mask, rows, positions)
            token_nll = F.cross_entropy(logits, torch.tensor(tokens, device=logits.device), reduction="none")
            nll.extend(_per_request_nll(token_nll, owner, len(chunk)))
    finally:
        for name, original in originals.items():
            get_parameter(model, name).copy_(original)
    return nll


def _ridge_update(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW (out, in) with ΔWᵀ = (KᵀK + ridge I)⁻¹ KᵀV, as ``(dense, None)`` or low-rank ``(left, right)``."""
    keys, values = keys.double(), values.double()
    rows, features = keys.shape
    if rows >= features:
        gram = keys.T @ keys + ridge * torch.eye(features, dtype=keys.dtype, device=keys.device)
        return torch.linalg.solve(gram, keys.T @ values).T, None
    # fewer rows than features: the same ΔW as Vᵀ (KKᵀ + ridge I)⁻¹ K, a (rows × rows) system
    gram = keys @ keys.T + ridge * torch.eye(rows, dtype=keys.dtype, device=keys.device)
    left, right = values.T.contiguous(), torch.linalg.solve(gram, keys)  # (out, rows), (rows, in)
    if rows > min(values.shape[1], features) // 2:  # low rank only while it is smaller
        return left @ right, None
    return left, right


def _edited_modules(arch: ArchSpec, hp: UltraEditHyperParams) -> list[tuple[int, str]]:
    """The (layer, module) pairs ``hp.modules`` names: each layer's MLP output projection or its inputs."""
    if hp.modules == "output":
        return [(layer, arch.rewrite_at(layer)) for layer in hp.layers]
    if not arch.mlp_inputs:
        raise FactEditError(f"modules='input': the architecture table names no MLP input projection for {arch.family}")
    return [(layer, module) for layer in hp.layers for module in arch.mlp_inputs_at(layer)]


def compute_ultraedit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: UltraEditHyperParams | None = None,
    *,
    state: UltraEditState | None = None,
    progress: Progress | bool | None = None,
) -> EditResult:
    """One UltraEdit turn for a batch of requests (the model is left unchanged).

    ``state`` carries the lifelong statistics: pass the same object to every batch of a sequence and call
    ``state.commit()`` once a batch's patch is applied (without it, a fresh one: statistics of this batch only).
    """
    hp = hparams or UltraEditHyperParams.for_model(model)
    hp.check_model(model)
    arch = arch_for(model)
    sites = _edited_modules(arch, hp)  # (layer, module) pairs, in layer order
    modules = [module for _, module in sites]
    weight_names = [f"{module}.weight" for module in modules]
    require_resident(model, weight_names, "edit with ultraedit")
    requests = check_batch(list(requests), hp.fact_token)
    problems, failures = [], []
    for r in requests:  # every request is checked before any pass; all failures reported together
        try:
            problems.append(build_value_problem(tok, r, ["{}"], hp.fact_token))
        except FactEditError as exc:
            failures.append(f"{r.text!r}: {exc}")
    if failures:
        raise FactEditError(
            f"{len(failures)} of {len(requests)} requests cannot be edited; nothing was changed: " + "; ".join(failures)
        )
    state = state if state is not None else UltraEditState()
    shapes = {}  # module -> its statistics' key (modules of one weight shape share them)
    for module, name in zip(modules, weight_names, strict=True):
        out_features, in_features = math_shape(get_parameter(model, name), arch)
        shapes[module] = _statistics_key(int(in_features), int(out_features))
    new_rows = sum(len(p.target) for p in problems)
    for key in set(shapes.values()):
        sharing = sum(1 for k in shapes.values() if k == key)
        if state.rows(key) + new_rows * sharing < 2:
            raise FactEditError(
                "UltraEdit standardises each feature by the running mean and spread of every target token seen so "
                f"far, and this batch would give it {new_rows * sharing} row(s) on a fresh state: the update would be "
                "zero. Edit at least two requests (or a multi-token target) together, or edit more layers"
            )
    progress = as_progress(progress)
    base_fp = model_fingerprint(model)
    timings: dict[str, float] = {}
    pad = pad_id(tok)

    started = time.perf_counter()
    turn = _gradients(model, arch, modules, problems, hp, pad, progress)
    timings["gradients"] = time.perf_counter() - started

    started = time.perf_counter()
    features = {m: torch.cat([torch.cat(turn.keys[m]), torch.cat(turn.grads[m])], dim=1) for m in modules}
    moments = {}
    for key in set(shapes.values()):
        rows = [features[m] for m in modules if shapes[m] == key]
        moments[key] = state.updated(key, torch.cat([r.cpu() for r in rows]))
    entries: list[PatchEntry] = []
    for (layer, module), name in zip(sites, weight_names, strict=True):
        keys = torch.cat(turn.keys[module])
        normalised = moments[shapes[module]].standardised(features[module])
        keys_hat, grads_hat = normalised.split([keys.shape[1], normalised.shape[1] - keys.shape[1]], dim=1)
        values = -hp.lr * (keys_hat * keys_hat).sum(1, keepdim=True) * grads_hat  # (rows, out)
        left, right = _ridge_update(keys, values.to(keys.device), hp.L2)
        weight = get_parameter(model, name)
        entries.append(
            PatchEntry(
                name=name,
                shape=tuple(weight.shape),
                transposed=arch.conv1d,
                base_sha256=tensor_sha256(weight),
                dense=left.float().cpu() if right is None else None,
                left=left.float().cpu() if right is not None else None,
                right=right.float().cpu() if right is not None else None,
            )
        )
        log.info(
            "layer %d (%s): %d rows, |v| %.3g, |ΔW| %.3g",
            layer,
            module.rsplit(".", 1)[-1],
            keys.shape[0],
            float(values.norm(dim=1).mean()),
            float(entries[-1].delta().norm()),
        )
    timings["solve"] = time.perf_counter() - started

    started = time.perf_counter()
    after = _nll_after(model, arch, problems, entries, hp, pad)
    timings["check"] = time.perf_counter() - started
    histories = [
        [
            {"total": before, "avg_prob": math.exp(-before)},
            {"total": nll, "avg_prob": math.exp(-nll)},
        ]
        for before, nll in zip(turn.nll, after, strict=True)
    ]
    patch = Patch.for_model(
        model,
        method="ultraedit",
        entries=entries,
        base_fingerprint=base_fp,
        requests=[r.to_dict() for r in requests],
        hparams=hp.model_dump(mode="json"),
        info={"timings": timings, "normaliser_rows": {k: int(m.count) for k, m in moments.items()}},
    )
    converged = [h[-1]["avg_prob"] >= CONVERGED_PROB for h in histories]
    return EditResult(patch=patch, requests=list(requests), converged=converged, losses=histories, timings=timings)
