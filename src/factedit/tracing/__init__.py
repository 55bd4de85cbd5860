"""Causal tracing: locate the states that carry a fact (ROME paper §2, Figs. 1–3).

``causal_trace(model, tokenizer, prompt, subject)`` traces one fact (``method="attribution"``:
first-order estimates, :mod:`factedit.tracing.attribution`, with ``verify=K`` exact re-patching of the
top cells);
``trace_dataset(model, tokenizer, out_dir)`` averages effects over the known facts;
``plot_trace_all`` / ``plot_average_effects`` draw paper-style figures (matplotlib,
imported only when plotting).
"""

from factedit.tracing.core import causal_trace
from factedit.tracing.dataset import read_results, trace_dataset, write_summary
from factedit.tracing.effects import BUCKETS, EffectTable, summarize
from factedit.tracing.kinds import ALL_KINDS, KINDS, SEVERED_KINDS, window_layers
from factedit.tracing.knowns import KnownFact, KnownPrediction, known_by_model, load_known_facts
from factedit.tracing.noise import embedding_std, make_noise, noise_scale
from factedit.tracing.plots import (
    plot_average_effects,
    plot_certificate,
    plot_trace,
    plot_trace_all,
    plot_trace_combined,
)
from factedit.tracing.result import TraceResult

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "SEVERED_KINDS",
    "TraceResult",
    "causal_trace",
    "make_noise",
    "window_layers",
    "BUCKETS",
    "EffectTable",
    "read_results",
    "summarize",
    "trace_dataset",
    "write_summary",
    "KnownFact",
    "KnownPrediction",
    "known_by_model",
    "load_known_facts",
    "embedding_std",
    "noise_scale",
    "plot_average_effects",
    "plot_certificate",
    "plot_trace",
    "plot_trace_all",
    "plot_trace_combined",
]
