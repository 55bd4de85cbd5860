"""Causal tracing of one fact (ROME paper §2.1, kmeng01/rome ``causal_trace.py``).

Three runs define the measurement (:mod:`factedit.tracing.runs`): the clean prompt,
``samples`` copies with the subject's embeddings noised (:mod:`factedit.tracing.noise`),
and restored runs, corrupted runs in which one state (token ``t``, layer ``l``) is put
back to its clean value; the mean answer probability is the score. The kinds of
state and the layer windows are in :mod:`factedit.tracing.kinds`.

Two runners give the same numbers: ``method="straightforward"``
(:mod:`factedit.tracing.straightforward`, the official way) and ``method="fast"``
(default, :mod:`factedit.tracing.fast`), which skips the work that cannot change.
``method="attribution"`` (:mod:`factedit.tracing.attribution`) estimates the scores to first order
from the same runs and one backward pass; ``verify=K`` then re-patches the top ``K`` cells (and a few
random ones) exactly with the fast runner and records how well the estimates agree.

This module is the entry point (:func:`causal_trace`); it also re-exports the names
callers have always imported from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit import precision
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, num_layers
from factedit.models.placement import module_device
from factedit.models.runtime import embedding_width
from factedit.progress import Progress, as_progress
from factedit.text import encode_with_subject
from factedit.tracing.attribution import AttributionTracer, certificate, choose_cells
from factedit.tracing.fast import FastTracer
from factedit.tracing.inputs import answer_token, layer_positions, split_prompt, token_positions
from factedit.tracing.kinds import (
    ALL_KINDS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_NOISE_FACTOR,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_WINDOW,
    KINDS,
    METHODS,
    SEVERED_KINDS,
    check_kinds,
    window_layers,
)
from factedit.tracing.noise import make_noise, noise_scale
from factedit.tracing.result import TraceResult
from factedit.tracing.runs import FactRuns, Restoration
from factedit.tracing.straightforward import StraightTracer

__all__ = [
    "ALL_KINDS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_NOISE_FACTOR",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEED",
    "DEFAULT_WINDOW",
    "KINDS",
    "METHODS",
    "SEVERED_KINDS",
    "TraceResult",
    "answer_token",
    "causal_trace",
    "check_trace_settings",
    "make_noise",
    "split_prompt",
    "window_layers",
]

log = logging.getLogger(__name__)

# Bounds of the settings (far above the paper's: 10 samples, window 10): one call must not ask for days
# of work or more memory than a machine has.
MAX_SAMPLES = 1000
MAX_WINDOW = 1000
MAX_BATCH_SIZE = 65_536
MAX_NOISE = 1e4
MAX_VERIFY = 100_000


def check_trace_settings(
    *,
    kinds: Sequence[str] | str = KINDS,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    noise_factor: float = DEFAULT_NOISE_FACTOR,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    method: str = "fast",
    autocast: str | None = None,
    verify: int = 0,
) -> list[str]:
    """Check a trace's settings without a model (the CLI calls it before loading one); returns the kinds."""
    kinds = check_kinds(kinds)
    precision.autocast_dtype(autocast)
    if method not in METHODS:
        raise FactEditError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(verify, bool) or not isinstance(verify, int) or not 0 <= verify <= MAX_VERIFY:
        raise FactEditError(
            f"verify (cells to re-patch exactly) must be a whole number from 0 to {MAX_VERIFY:,}, got {verify!r}"
        )
    if verify and method != "attribution":
        raise FactEditError("verify re-patches the cells of an estimated trace: it needs method 'attribution'")
    for name, value, high in (("samples", samples, MAX_SAMPLES), ("window", window, MAX_WINDOW)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise FactEditError(f"{name} must be a whole number from 1 to {high:,}, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise FactEditError(f"batch size must be a whole number from 1 to {MAX_BATCH_SIZE:,}, got {batch_size!r}")
    if noise is not None and not (isinstance(noise, (int, float)) and math.isfinite(noise) and 0 <= noise <= MAX_NOISE):
        raise FactEditError(f"noise scale must be a number from 0 to {MAX_NOISE:g}, got {noise!r}")
    if noise is None and not (
        isinstance(noise_factor, (int, float)) and math.isfinite(noise_factor) and 0 < noise_factor <= MAX_NOISE
    ):
        raise FactEditError(f"noise factor must be a number above 0 and at most {MAX_NOISE:g}, got {noise_factor!r}")
    return kinds


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
    verify: int = 0,
    progress: Progress | bool | None = None,
) -> TraceResult:
    """Trace one fact: which hidden states / MLP / attention outputs carry it to the answer.

    ``prompt`` is the full prompt containing ``subject`` (or a template with ``{}``).
    ``noise``: fixed noise scale; ``None`` uses ``noise_factor`` × the std of subject-token
    embeddings over the known facts (computed once per model, cached on disk).
    ``tokens``: restrict the traced token positions (all kinds, or per kind); ``layers``:
    restrict the (centre) layers; scores not traced are NaN.
    ``sever_all_tokens``: severed kinds freeze the MLP/attention outputs at every token
    from ``t`` on (default: at token ``t`` only, the official notebook's convention).
    ``autocast``: "bfloat16" runs the forward passes under ``torch.autocast`` (much faster on
    CPUs with AMX; scores then differ from float32 ones by bfloat16 rounding).
    ``method="attribution"``: first-order estimates (:mod:`factedit.tracing.attribution`); the result's
    ``estimates`` hold them everywhere. ``verify=K`` (attribution only): re-patch the top ``K`` cells per
    kind by estimated effect and a few seeded random ones exactly; ``scores`` then hold the exact values
    there (listed in ``exact_cells``) and ``certificate`` the agreement per kind.
    ``progress`` gets one stage, ``trace (<method>)``, counted in restorations (in backward passes for
    attribution, followed by a ``verify`` stage counted in restorations).
    """
    started = time.perf_counter()
    kinds = check_trace_settings(  # refuse a bad option before any work
        kinds=kinds,
        samples=samples,
        noise=noise,
        noise_factor=noise_factor,
        window=window,
        batch_size=batch_size,
        method=method,
        autocast=autocast,
        verify=verify,
    )
    arch = arch_for(model)
    template = split_prompt(prompt, subject)
    encoded = encode_with_subject(tokenizer, template, subject)
    if len(encoded) == 0:
        raise FactEditError("prompt tokenizes to nothing")
    answer_given = answer is not None
    answer_id = answer_token(tokenizer, encoded.text, answer) if answer_given else None
    T, L = len(encoded), num_layers(model)
    wanted = token_positions(tokens, kinds, T)
    layer_list = layer_positions(layers, L)
    if noise is None:
        scale = noise_factor * noise_scale(model, tokenizer)
    else:
        scale = float(noise)

    n_subj = encoded.subject_last - encoded.subject_first + 1
    dtype = next(model.parameters()).dtype
    device = module_device(model, arch.embed)  # the noise is added to the embedding's output
    noise_t = make_noise(samples, n_subj, embedding_width(model, arch), scale, seed).to(device=device, dtype=dtype)
    with precision.autocast(model, autocast):
        keep_kv = method == "fast" or (method == "attribution" and verify > 0)  # the fast runner's prefix cache
        graph = method == "attribution" and any(k not in SEVERED_KINDS for k in kinds)  # gradients from this run
        fact = FactRuns(model, arch, encoded, noise_t, kinds, keep_corrupted_kv=keep_kv, keep_graph=graph)

    predicted_id = int(fact.clean_dist.argmax())
    if answer_id is None:
        answer_id = predicted_id
    matches = answer_id == predicted_id
    predicted = tokenizer.decode([predicted_id])
    answer_text = tokenizer.decode([answer_id])
    if not matches:
        log.warning(
            "the model's top prediction for %r is %r (p=%.3f), not the given answer %r (p=%.3f); tracing %r anyway",
            encoded.text,
            predicted,
            float(fact.clean_dist[predicted_id]),
            answer_text,
            float(fact.clean_dist[answer_id]),
            answer_text,
        )
    clean_prob = float(fact.clean_dist[answer_id])
    low_prob = float(fact.corr_dists[:, answer_id].mean())

    scores = {k: np.full((T, L), np.nan) for k in kinds}
    jobs: list[Restoration] = []
    estimates: dict[str, np.ndarray] = {}
    exact_cells: dict[str, list[tuple[int, int]]] = {}
    certificates: dict[str, dict] = {}
    extra_meta: dict = {}
    progress = as_progress(progress)
    if method == "straightforward":
        tracer: FastTracer | StraightTracer = StraightTracer(fact, answer_id, window, sever_all_tokens)
    else:
        tracer = FastTracer(fact, answer_id, window, batch_size, sever_all_tokens)
    if method == "attribution":
        estimator = AttributionTracer(fact, answer_id, window, sever_all_tokens)
        with (
            progress.stage("trace (attribution)", total=estimator.passes(kinds, wanted), unit="pass") as stage,
            precision.autocast(model, autocast),
        ):
            effects = estimator.effects(kinds, wanted, layer_list, stage)
        estimates = {k: low_prob + m for k, m in effects.items()}
        scores = {k: m.copy() for k, m in estimates.items()}
        extra_meta["seconds_estimate"] = round(time.perf_counter() - started, 3)
        chosen = choose_cells(effects, encoded.subject_first, verify, seed) if verify else {}
        for kind, cells in chosen.items():
            jobs += [Restoration(kind, t, layer, tracer.start_layer(kind, layer)) for t, layer, _ in cells]
    else:
        for kind in kinds:
            for t in wanted[kind]:
                if method == "fast" and t < encoded.subject_first:
                    scores[kind][t, layer_list] = low_prob  # nothing differs from the clean run before the subject
                    continue
                for layer in layer_list:
                    jobs.append(Restoration(kind, t, layer, tracer.start_layer(kind, layer)))
    stage_name = "verify" if method == "attribution" else f"trace ({method})"
    if jobs or method != "attribution":
        with (
            progress.stage(stage_name, total=len(jobs), unit="restore") as stage,
            precision.autocast(model, autocast),
        ):
            values = tracer.run(jobs, stage)
        for job, value in zip(jobs, values, strict=True):
            scores[job.kind][job.t, job.layer] = value
    if method == "attribution" and verify:
        for kind, cells in chosen.items():
            exact = [scores[kind][t, layer] for t, layer, _ in cells]
            exact_cells[kind] = [(t, layer) for t, layer, _ in cells]
            certificates[kind] = certificate(cells, estimates[kind], exact, verify)
    elapsed = time.perf_counter() - started
    log.info("traced %r (%d tokens, %d restorations, %s) in %.1fs", encoded.text, T, len(jobs), method, elapsed)
    return TraceResult(
        prompt=encoded.text,
        subject=subject,
        tokens=[tokenizer.decode([i]) for i in encoded.ids],
        token_ids=list(encoded.ids),
        subject_range=(encoded.subject_first, encoded.subject_last + 1),
        answer=answer_text,
        answer_id=int(answer_id),
        predicted=predicted,
        predicted_id=predicted_id,
        answer_is_prediction=matches,
        clean_prob=clean_prob,
        low_prob=low_prob,
        scores=scores,
        samples=samples,
        noise=scale,
        window=window,
        seed=seed,
        method=method,
        sever_all_tokens=sever_all_tokens,
        estimates=estimates,
        exact_cells=exact_cells,
        certificate=certificates,
        meta={
            "seconds": round(elapsed, 3),
            "restorations": len(jobs),
            **extra_meta,
            "answer_given": answer_given,
            "model_type": getattr(model.config, "model_type", None),
            "num_layers": L,
            "noise_factor": noise_factor if noise is None else None,
            "batch_size": batch_size,
            "autocast": str(precision.autocast_dtype(autocast)).replace("torch.", "") if autocast else None,
            **({"verify": verify} if method == "attribution" else {}),
        },
    )
