"""What a causal trace can restore, how a window of layers is chosen, and the paper's default settings.

Kinds of state: ``hidden`` (the block output at layer ``l``), ``mlp`` and ``attn``
(the module outputs at token ``t`` in a *window* of layers around ``l``), and the
severed paths of the paper's Fig. 3: ``hidden_sever_mlp`` / ``hidden_sever_attn``
restore the hidden state while the MLP (attention) outputs of the layers above ``l``
stay at their corrupted values.
"""

from __future__ import annotations

from collections.abc import Sequence

from factedit.errors import FactEditError

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
SEVERED_KINDS: tuple[str, ...] = ("hidden_sever_mlp", "hidden_sever_attn")
ALL_KINDS: tuple[str, ...] = KINDS + SEVERED_KINDS
# fast and straightforward compute the same exact scores; attribution estimates them to first order.
METHODS: tuple[str, ...] = ("fast", "straightforward", "attribution")
DEFAULT_SAMPLES = 10
DEFAULT_WINDOW = 10
DEFAULT_NOISE_FACTOR = 3.0
DEFAULT_SEED = 1
DEFAULT_BATCH_SIZE = 512


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for an MLP/attention score centred at ``layer`` (official convention).

    A window ``w`` covers layers ``l - w//2 … l + ceil(w/2) - 1`` (``l-5 … l+4`` for
    ``w = 10``), clipped to the model's layers.
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def check_kinds(kinds: Sequence[str] | str) -> list[str]:
    """The kinds to trace, deduplicated in order; ``"all"`` means the three main kinds."""
    if isinstance(kinds, str):
        kinds = list(KINDS) if kinds == "all" else [kinds]
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise FactEditError(f"unknown kind(s) {bad or kinds}: choose from {', '.join(ALL_KINDS)} or 'all'")
    return kinds
