"""The one place that knows where things live inside each model family.

Algorithms ask an :class:`ArchSpec` for module names ("the MLP output projection
of layer 6") and never test ``model_type`` themselves. To support a new family,
add one entry to :data:`ARCHITECTURES` (and, if ROME should have tuned defaults
for it, a file ``hparams/rome/<family>.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from factedit.errors import FactEditError


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates of one model family; ``{}`` stands for the layer index."""

    family: str
    embed: str
    blocks: str  # the ModuleList of transformer blocks
    attn: str
    mlp: str
    rewrite: str  # MLP output projection that ROME/MEMIT rewrite; its input is the key k
    final_norm: str
    lm_head: str
    conv1d: bool = False  # GPT-2's Conv1D stores weight as (in, out) instead of (out, in)
    # the MLP's input projections (its input is the block's normalised hidden state), e.g. Llama's gate and up
    mlp_inputs: tuple[str, ...] = ()
    # a norm between the MLP's output and the residual stream (Gemma 3's post_feedforward_layernorm):
    # then a change of the rewrite module's output is not the change it makes to the residual
    mlp_post_norm: str = ""

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def attn_at(self, layer: int) -> str:
        return self.attn.format(layer)

    def mlp_at(self, layer: int) -> str:
        return self.mlp.format(layer)

    def rewrite_at(self, layer: int) -> str:
        return self.rewrite.format(layer)

    def rewrite_weight_at(self, layer: int) -> str:
        return f"{self.rewrite.format(layer)}.weight"

    def mlp_inputs_at(self, layer: int) -> list[str]:
        return [name.format(layer) for name in self.mlp_inputs]

    def mlp_post_norm_at(self, layer: int) -> str | None:
        return self.mlp_post_norm.format(layer) if self.mlp_post_norm else None


def _llama_like(
    family: str, mlp_inputs: tuple[str, ...] = ("gate_proj", "up_proj"), mlp_post_norm: str = ""
) -> ArchSpec:
    return ArchSpec(
        family=family,
        embed="model.embed_tokens",
        blocks="model.layers",
        attn="model.layers.{}.self_attn",
        mlp="model.layers.{}.mlp",
        rewrite="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
        mlp_inputs=tuple(f"model.layers.{{}}.mlp.{name}" for name in mlp_inputs),
        mlp_post_norm=mlp_post_norm,
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        family="gpt2",
        embed="transformer.wte",
        blocks="transformer.h",
        attn="transformer.h.{}.attn",
        mlp="transformer.h.{}.mlp",
        rewrite="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        conv1d=True,
        mlp_inputs=("transformer.h.{}.mlp.c_fc",),
    ),
    "gptj": ArchSpec(
        family="gptj",
        embed="transformer.wte",
        blocks="transformer.h",
        attn="transformer.h.{}.attn",
        mlp="transformer.h.{}.mlp",
        rewrite="transformer.h.{}.mlp.fc_out",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        mlp_inputs=("transformer.h.{}.mlp.fc_in",),
    ),
    "gpt_neox": ArchSpec(
        family="gpt_neox",
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        attn="gpt_neox.layers.{}.attention",
        mlp="gpt_neox.layers.{}.mlp",
        rewrite="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        mlp_inputs=("gpt_neox.layers.{}.mlp.dense_h_to_4h",),
        lm_head="lm_head",  # transformers 5 renamed GPTNeoXForCausalLM.embed_out to lm_head
    ),
    "llama": _llama_like("llama"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "mistral": _llama_like("mistral"),
    "gemma3": _llama_like("gemma3", mlp_post_norm="model.layers.{}.post_feedforward_layernorm"),
    "phi3": _llama_like("phi3", ("gate_up_proj",)),  # Phi-3 fuses gate and up into one projection
}

# model_type values that share another family's layout.
ALIASES: dict[str, str] = {"gemma3_text": "gemma3"}


def arch_for(model_or_type: nn.Module | str) -> ArchSpec:
    """The :class:`ArchSpec` for a model (or a ``config.model_type`` string)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None) or "<no config>"
    family = ALIASES.get(model_type, model_type)
    if family not in ARCHITECTURES:
        supported = ", ".join(sorted([*ARCHITECTURES, *ALIASES]))
        raise FactEditError(
            f"unknown architecture {model_type!r}: supported families are {supported}. "
            "To add one, put an ArchSpec with its module-name templates into "
            "factedit.models.architectures.ARCHITECTURES."
        )
    return ARCHITECTURES[family]


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def check_layer(model: nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise FactEditError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return layer


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the architecture table."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise FactEditError(
            f"module {name!r} not found in {type(model).__name__}; the architecture table "
            "entry for this family does not match the model"
        ) from exc


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as exc:
        raise FactEditError(f"parameter {name!r} not found in {type(model).__name__}") from exc


def weight_to_math(weight: torch.Tensor, arch: ArchSpec) -> torch.Tensor:
    """View a rewrite weight as (out, in), whatever its storage layout."""
    return weight.T if arch.conv1d else weight


def math_to_weight(delta: torch.Tensor, arch: ArchSpec) -> torch.Tensor:
    """Turn an (out, in) update into the storage layout of the rewrite weight."""
    return delta.T if arch.conv1d else delta


def math_shape(weight: torch.Tensor, arch: ArchSpec) -> torch.Size:
    """Shape of a rewrite weight's (out, in) view, e.g. to allocate updates or gradients in that view."""
    return weight_to_math(weight, arch).shape
