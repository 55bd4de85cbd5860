"""Attribution patching: a causal trace estimated to first order (``method="attribution"``).

The exact trace (:mod:`factedit.tracing.fast`) re-runs the model once per restored state. Attribution
patching (AtP; Nanda 2023, "Attribution patching: activation patching at industrial scale"; Kramár et
al. 2024, arXiv 2403.00745) estimates every restoration at once from the runs the exact trace already
makes plus one backward pass. For a state ``s`` (token ``t``, layer ``l``) and noise sample ``n``::

    effect(s) ≈ mean_n (s_clean - s_corrupt,n) · ∂p_n / ∂s |corrupted run n

``p_n`` is the answer probability of corrupted sample ``n`` at the last token (softmax in float32,
the LM head with the config's soft-capping), the quantity whose mean over the samples the exact trace
scores; so one backward pass of ``mean_n p_n`` through the ``N`` corrupted rows gives every gradient.
The clean states, the noise (same samples, same seed) and the corrupted runs are those of
:class:`~factedit.tracing.runs.FactRuns`, exactly as the exact trace uses them; the gradients are taken
through that corrupted run itself (recorded by autograd), so the map costs one clean forward, one
corrupted forward and one backward pass. The estimated score is
``low_prob + effect``.

* ``hidden``: ``s`` is block ``l``'s output at token ``t``.
* ``mlp`` / ``attn``: the exact trace restores the module outputs of a *window* of layers at once; the
  estimate is the **sum of the per-layer estimates over the window** (:func:`window_sums`). This is the
  first-order estimate of the sum of the single-layer restorations, not of the joint one: the gradient at
  layer ``j`` includes paths through the window's later layers at token ``t``, which the joint restoration
  holds at their clean values, so the sum counts those paths twice. With window 1 the estimate is the
  first-order term of the exact score.
* ``hidden_sever_mlp`` / ``hidden_sever_attn``: as ``hidden``, with the gradient taken in a backward pass
  where the MLP (attention) outputs at token ``t`` (at tokens ``t…T-1`` with ``sever_all_tokens``) are
  held constant, exactly what the severed restoration freezes; one extra backward pass per traced token.

What is taken from AtP* and what not, and why:

* AtP's estimator itself (clean minus corrupted activation times the gradient at the corrupted run),
  averaged over the noise samples with each sample's own gradient (the paper's distributional setting).
* AtP*'s **QK fix** (recompute the attention softmax exactly when the patched node is a query or a key)
  is not applied: it concerns attention-pattern nodes, and none of the traced states is one (block
  outputs, MLP outputs, attention-module outputs after the softmax and output projection). The softmaxes
  *downstream* of a restored state are linearised like every other downstream nonlinearity, the error
  source arXiv 2606.09899 identifies as dominant.
* AtP*'s **GradDrop** (repeat the backward pass once per layer with that layer's residual contribution
  dropped, and average the absolute estimates) is not applied: it returns unsigned magnitudes, while the
  trace is a map of signed restored probabilities compared cell by cell with the exact one, and it would
  cost one backward pass per layer. The cancellations it guards against (false negatives) are only
  sampled, by the certificate's random cells.
* AtP*'s advice to verify the top candidates by real patching is the **certificate**
  (:func:`choose_cells`, :func:`certificate`): the top-K cells by estimated effect plus a few seeded
  random cells are re-patched exactly by the fast runner, and the agreement is reported per kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from factedit.hooks import Trace, TraceDict, frozen
from factedit.models.runtime import lm_logits
from factedit.progress import Stage
from factedit.tracing.kinds import SEVERED_KINDS, window_layers
from factedit.tracing.runs import CorruptedGraph, FactRuns

WINDOWED = ("mlp", "attn")


def random_cell_count(k: int) -> int:
    """Random cells re-patched beside the top ``k``: half as many, at least two (none without a top)."""
    return 0 if k <= 0 else max(2, k // 2)


def window_sums(per_layer: np.ndarray, window: int) -> np.ndarray:
    """(T, L) per-layer estimates summed over each centre's window (:func:`~factedit.tracing.kinds.window_layers`)."""
    n_layers = per_layer.shape[1]
    out = np.empty_like(per_layer)
    for centre in range(n_layers):
        out[:, centre] = per_layer[:, window_layers(centre, window, n_layers)].sum(axis=1)
    return out


class AttributionTracer:
    """First-order estimates of the indirect effects of one fact, from its :class:`FactRuns`."""

    def __init__(self, fact: FactRuns, answer_id: int, window: int, sever_all_tokens: bool) -> None:
        self.f = fact
        self.answer_id = answer_id
        self.window = window
        self.sever_all_tokens = sever_all_tokens

    def passes(self, kinds: Sequence[str], wanted: dict[str, list[int]]) -> int:
        """Backward passes :meth:`effects` makes (what a progress stage counts)."""
        main = any(k not in SEVERED_KINDS for k in kinds)
        severed = sum(len([t for t in wanted[k] if t >= self.f.first]) for k in kinds if k in SEVERED_KINDS)
        return int(main) + severed

    def effects(
        self, kinds: Sequence[str], wanted: dict[str, list[int]], layers: Sequence[int], stage: Stage
    ) -> dict[str, np.ndarray]:
        """Estimated indirect effects ``[kind] -> (T, L)``; NaN where not traced, 0 before the subject.

        ``wanted[kind]``: the token positions to trace; ``layers``: the (centre) layers.
        """
        f, arch = self.f, self.f.arch
        T, L = len(f.ids), f.n_layers
        out: dict[str, np.ndarray] = {}
        main = [k for k in kinds if k not in SEVERED_KINDS]
        if main:
            modules = {
                "hidden": [arch.block(i) for i in range(L)],
                "mlp": [arch.mlp_at(i) for i in range(L)],
                "attn": [arch.attn_at(i) for i in range(L)],
            }
            clean = {"hidden": f.clean_h, "mlp": f.clean_mlp, "attn": f.clean_attn}
            names = [n for k in main for n in modules[k]]
            graph = f.take_graph()  # the corrupted run itself, when it was recorded: no second forward
            states, grads = self._gradients(names) if graph is None else self._score_gradients(graph, names)
            for kind in main:
                per_layer = np.stack(
                    [_dot(clean[kind][i], states[n], grads[n]) for i, n in enumerate(modules[kind])], axis=1
                )  # (T, L)
                out[kind] = window_sums(per_layer, self.window) if kind in WINDOWED else per_layer
            stage.advance(1)
        for kind in [k for k in kinds if k in SEVERED_KINDS]:
            held = [arch.mlp_at(i) if kind == "hidden_sever_mlp" else arch.attn_at(i) for i in range(L)]
            blocks = [arch.block(i) for i in range(L)]
            m = np.full((T, L), np.nan)
            for t in wanted[kind]:
                if t < f.first:
                    continue
                held_tokens = range(t, T) if self.sever_all_tokens else range(t, t + 1)
                states, grads = self._gradients(blocks, held=held, held_tokens=held_tokens)
                one = slice(t, t + 1)
                m[t] = [_dot(f.clean_h[i][one], states[n][:, one], grads[n][:, one])[0] for i, n in enumerate(blocks)]
                stage.advance(1)
            out[kind] = m
        cols = np.array(layers, dtype=int)
        for kind in kinds:  # the selection; before the subject nothing differs from the clean run: effect 0
            m = np.full((T, L), np.nan)
            rows = np.array([t for t in wanted[kind] if t >= f.first], dtype=int)
            early = np.array([t for t in wanted[kind] if t < f.first], dtype=int)
            m[np.ix_(rows, cols)] = out[kind][np.ix_(rows, cols)]
            m[np.ix_(early, cols)] = 0.0
            out[kind] = m
        return out

    def _gradients(
        self, names: list[str], held: Sequence[str] = (), held_tokens: range = range(0)
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Outputs of the modules ``names`` in the corrupted run and the gradients of the mean answer
        probability with respect to them; the outputs of ``held`` at ``held_tokens`` count as constants."""
        f, arch, model = self.f, self.f.arch, self.f.model
        batch = f.ids[None].expand(f.samples, -1)

        def noised(x: torch.Tensor, name: str) -> torch.Tensor:
            return f.add_noise(x).requires_grad_(True)  # the graph starts at the corrupted embeddings

        def hold(out: torch.Tensor, name: str) -> torch.Tensor:
            mask = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
            mask[held_tokens.start : held_tokens.stop] = True
            return torch.where(mask[None, :, None], out.detach(), out)

        with torch.enable_grad(), frozen(model):
            with (
                Trace(model, arch.embed, retain_output=False, edit_output=noised),
                TraceDict(model, list(held), retain_output=False, edit_output=hold),
                TraceDict(model, names, detach=False) as td,
                Trace(model, arch.final_norm, stop=True, detach=False) as fin,
            ):
                model(input_ids=batch, use_cache=False)
        return self._score_gradients(CorruptedGraph({n: td[n].output for n in names}, fin.output), names)

    def _score_gradients(
        self, graph: CorruptedGraph, names: list[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The outputs ``names`` of a recorded corrupted run and the gradients of its mean answer probability."""
        outputs = [graph.outputs[n] for n in names]
        with torch.enable_grad():
            logits = lm_logits(self.f.model, self.f.arch, graph.final[:, -1])
            score = torch.softmax(logits.float(), dim=-1)[:, self.answer_id].mean()
            grads = torch.autograd.grad(score, outputs, allow_unused=True)
        states = {n: out.detach() for n, out in zip(names, outputs, strict=True)}
        return states, {n: torch.zeros_like(states[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


def _dot(clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor) -> np.ndarray:
    """Per token: the sum over samples of (clean − corrupted) · gradient of the sample mean, in float64."""
    delta = clean.to(corrupted.device, torch.float64)[None] - corrupted.double()
    return (delta * grad.to(corrupted.device, torch.float64)).sum(dim=(0, 2)).cpu().numpy()


# ----------------------------------------------------------------------------- certificate


def choose_cells(
    effects: dict[str, np.ndarray], first: int, k: int, seed: int
) -> dict[str, list[tuple[int, int, str]]]:
    """Per kind, the cells to re-patch: the ``k`` largest estimated effects (``"top"``) and
    :func:`random_cell_count` seeded random others (``"random"``), among the traced cells at or after the
    subject's first token (before it, the estimate and the exact score are both the corrupted one)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[int, int, str]]] = {}
    for kind, m in effects.items():
        cand = [(t, layer) for t, layer in zip(*np.nonzero(np.isfinite(m)), strict=True) if t >= first]
        values = np.array([m[t, layer] for t, layer in cand])
        order = np.argsort(-values, kind="stable")
        top = [cand[i] for i in order[:k]]
        rest = [cand[i] for i in order[k:]]
        picks = rng.choice(len(rest), size=min(len(rest), random_cell_count(k)), replace=False) if rest else []
        out[kind] = [(int(t), int(layer), "top") for t, layer in top] + [
            (int(rest[i][0]), int(rest[i][1]), "random") for i in sorted(picks)
        ]
    return out


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (as Spearman's coefficient needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN with fewer than two cells or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return math.nan
    rx, ry = rank(x), rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def top_overlap(estimated: Sequence[float], exact: Sequence[float], k: int) -> float:
    """Share of the ``k`` largest estimates that are among the ``k`` largest exact values."""
    k = min(k, len(estimated))
    if k <= 0:
        return math.nan
    top_est = set(np.argsort(-np.asarray(estimated, dtype=float), kind="stable")[:k].tolist())
    top_exact = set(np.argsort(-np.asarray(exact, dtype=float), kind="stable")[:k].tolist())
    return len(top_est & top_exact) / k


def certificate(
    cells: list[tuple[int, int, str]], estimates: np.ndarray, exact: Sequence[float], k: int
) -> dict[str, Any]:
    """Agreement of estimated and exact scores at the re-patched cells of one kind.

    ``spearman``: rank correlation over all re-patched cells (top and random); ``top_k_overlap``: share
    of the ``k`` top estimated cells that are also the ``k`` top exact ones *among the re-patched cells*
    (the exact values elsewhere are not known); ``max_abs_error``: the largest |estimate − exact|.
    """
    est = [float(estimates[t, layer]) for t, layer, _ in cells]
    exact = [float(v) for v in exact]
    return {
        "k": k,
        "n_random": sum(pick == "random" for *_, pick in cells),
        "spearman": _finite_or_none(spearman(est, exact)),
        "top_k_overlap": _finite_or_none(top_overlap(est, exact, k)),
        "max_abs_error": max((abs(a - b) for a, b in zip(est, exact, strict=True)), default=None),
        "cells": [
            {"token": t, "layer": layer, "pick": pick, "estimate": e, "exact": x}
            for (t, layer, pick), e, x in zip(cells, est, exact, strict=True)
        ],
    }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
