"""What a forward pass needs to know about a model beyond module names: LM-head logits and widths.

Algorithms that cut a forward short (read the final norm's output, run the LM head
on a few vectors only) must apply exactly what the model's own head would, so the
config-dependent parts (Gemma's logit soft-capping) live here and not in each caller.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from factedit.models.architectures import ArchSpec, get_module
from factedit.models.placement import device_of

log = logging.getLogger(__name__)


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


def mlp_output_change(
    model: nn.Module, arch: ArchSpec, layer: int, current: torch.Tensor, residual_change: torch.Tensor
) -> torch.Tensor:
    """The change of the rewrite module's output that changes the residual stream by ``residual_change``.

    MEMIT (and every method solving for its residuals) writes ΔW k = R, which moves the residual by R only
    when the MLP's output is added to it as it is. Where a norm sits between them (Gemma 3's
    post-feedforward norm) the residual receives norm(m): the output m* whose norm(m*) is nearest to
    norm(m) + R is solved for per row (L-BFGS through the model's own norm module, from m) and m* − m
    returned. A norm fixes its output's RMS before the gain, so a residual change that alters that RMS is
    met only up to it; the remaining share is logged. Rows are ``(n, d)``, ``current`` the module's output at
    each request's position; without such a norm ``residual_change`` is returned unchanged.
    """
    name = arch.mlp_post_norm_at(layer)
    if name is None:
        return residual_change
    norm = get_module(model, name)
    device = device_of(norm)
    start = current.detach().to(device=device, dtype=torch.float32)
    change = residual_change.detach().to(device=device, dtype=torch.float32)
    with torch.no_grad():
        target = norm(start).float() + change
    x = start.clone().requires_grad_(True)
    solver = torch.optim.LBFGS(
        [x], lr=1.0, max_iter=200, history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def mismatch() -> torch.Tensor:
        with torch.enable_grad():
            loss = (norm(x).float() - target).pow(2).sum()
            (x.grad,) = torch.autograd.grad(loss, x)  # the norm's own parameters collect no gradient
        return loss.detach()

    solver.step(mismatch)
    with torch.no_grad():
        missed = (norm(x).float() - target).norm(dim=1) / change.norm(dim=1).clamp_min(1e-12)
    log.info("layer %d: residual change met through %s up to %.2g of its norm (median)", layer, name,
             float(missed.median()))  # fmt: skip
    return (x.detach() - start).to(residual_change.device, residual_change.dtype)
