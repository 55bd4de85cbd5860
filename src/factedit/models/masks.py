"""Explicit attention masks, with the model's sliding-window policy applied from its config.

A caller that packs several sequences into one (causal tracing's fast runner) knows
which key each query may see, but the model cannot build that mask itself. Passing a
4D mask bypasses the model's own construction, sliding windows included, so the
window and per-layer attention types are applied here: a ``{layer type: mask}`` dict
for models with ``layer_types`` (Gemma 3, Qwen 2/3), one windowed mask for models
whose every layer slides (Mistral, Phi-3 with ``sliding_window``), one plain mask
otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from factedit.errors import FactEditError
from factedit.models.runtime import text_config

SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``(1, 1, Q, K)`` additive mask: 0 where ``allowed`` (Q, K) is true, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def attention_masks(
    model: nn.Module, allowed: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive ``(1, 1, Q, K)`` mask(s) for the model from a boolean ``allowed`` (Q, K).

    ``query_pos`` / ``key_pos`` are the token positions of the queries and keys; a
    sliding layer additionally hides keys at least ``sliding_window`` positions back.
    Refuses (FactEditError) attention layer types it does not know.
    """
    config = text_config(model)
    dtype = model.dtype
    window = getattr(config, "sliding_window", None)

    def windowed() -> torch.Tensor:
        return additive_mask(allowed & (key_pos[None, :] > query_pos[:, None] - int(window)), dtype)

    types = set(getattr(config, "layer_types", None) or [])
    if types and types != {"full_attention"}:
        unknown = types - SUPPORTED_LAYER_TYPES
        if unknown or window is None:
            raise FactEditError(
                f"explicit attention masks do not support attention layer types {sorted(unknown)}"
                + ("" if unknown else " (sliding layers without a sliding_window)")
            )
        return {"full_attention": additive_mask(allowed, dtype), "sliding_attention": windowed()}
    if not types and window is not None:
        return windowed()
    return additive_mask(allowed, dtype)
