"""What a forward pass needs to know about a model beyond module names: LM-head logits and widths.

Algorithms that cut a forward short (read the final norm's output, run the LM head
on a few vectors only) must apply exactly what the model's own head would, so the
config-dependent parts (Gemma's logit soft-capping) live here and not in each caller.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from factedit.models.architectures import ArchSpec, get_module
from factedit.models.placement import device_of


def text_config(model: nn.Module) -> Any:
    """The config of the language model itself (multimodal configs nest it)."""
    return model.config.get_text_config()


def lm_logits(model: nn.Module, arch: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits from final-norm outputs, with the config's logit soft-capping if it has one.

    ``hidden`` is moved to the head's device first (with a device map the final norm and the head may
    sit on different devices); the logits stay there."""
    head = get_module(model, arch.lm_head)
    logits = head(hidden.to(device_of(head)))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def embedding_width(model: nn.Module, arch: ArchSpec) -> int:
    """Width of the embedding module's output (the residual stream), from the module when it says."""
    embed = get_module(model, arch.embed)
    return int(getattr(embed, "embedding_dim", 0) or text_config(model).hidden_size)
