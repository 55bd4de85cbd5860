"""Key/value caches as plain per-layer tensors, hiding the transformers ``Cache`` classes.

Fast paths (value optimisation, causal tracing) run a prefix once, keep its keys and
values, reshape them (slice, gather, select rows) and feed them back as the past of
later forwards. They handle :data:`KVStates`, a list of ``(keys, values)`` per layer,
each ``(batch, heads, positions, head_dim)``; only this module builds or reads caches.

Every cache made here has *full* layers only (no config is given to it): a
sliding-window layer would drop early positions, which the fast paths need to keep
(they pass their own masks or left-align positions so the window still applies).

With a device map each layer's keys and values stay on that layer's device; the index tensors
given here are moved to each layer's device, never the states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache, DynamicCache

KVStates = list[tuple[torch.Tensor | None, torch.Tensor | None]]


def full_cache(states: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> Cache:
    """A cache keeping every position of every layer, empty or pre-filled with ``states``.

    A layer given as ``(None, None)`` starts empty (its block runs from scratch).
    """
    if states is None:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=list(states))


def cache_states(cache: Cache) -> KVStates:
    """The ``(keys, values)`` of each layer of a filled cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefix_states(states: KVStates, length: int, first_layer: int = 0) -> KVStates:
    """The first ``length`` positions of each layer; layers below ``first_layer`` left empty."""
    return [
        (None, None) if i < first_layer else (k[:, :, :length], v[:, :, :length]) for i, (k, v) in enumerate(states)
    ]


def gather_positions(states: KVStates, source: torch.Tensor) -> KVStates:
    """Per-row position gather: new slot ``s`` of row ``b`` holds old position ``source[b, s]``."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        index = source.to(x.device)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
        return x.gather(2, index)

    return [(gather(k), gather(v)) for k, v in states]


def select_rows(states: KVStates, rows: torch.Tensor) -> KVStates:
    """The states of a subset of batch rows."""
    return [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in states]
