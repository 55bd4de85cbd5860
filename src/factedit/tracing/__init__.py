"""Causal tracing: locate the states that carry a fact (ROME paper §2, Figs. 1–3)."""

from factedit.tracing.core import (
    ALL_KINDS, KINDS, SEVERED_KINDS, TraceResult, causal_trace, make_noise, window_layers,
)
from factedit.tracing.knowns import KnownFact, KnownPrediction, known_by_model, load_known_facts
from factedit.tracing.noise import embedding_std, noise_scale

__all__ = [
    "ALL_KINDS", "KINDS", "SEVERED_KINDS", "TraceResult", "causal_trace", "make_noise", "window_layers",
    "KnownFact", "KnownPrediction", "known_by_model", "load_known_facts", "embedding_std", "noise_scale",
]
