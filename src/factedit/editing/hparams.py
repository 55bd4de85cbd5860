"""Hyper-parameters: one strict, validated object per method, one JSON file per method x family.

Names follow the official ROME code (kmeng01/rome ``hparams/ROME/*.json``) so
published settings can be read side by side. Module names are *not* here: they
come from the architecture table.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, check_layer


class HyperParams(BaseModel):
    """Base: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def method(cls) -> str:
        raise NotImplementedError

    @classmethod
    def from_json(cls, path: str | Path) -> HyperParams:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FactEditError(f"cannot read hyper-parameters {path}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> HyperParams:
        data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys document files
        try:
            return cls(**data)
        except ValidationError as exc:
            raise FactEditError(f"invalid {cls.method()} hyper-parameters in {source}: {exc}") from exc

    @classmethod
    def for_model(cls, model: nn.Module, **overrides) -> HyperParams:
        """Defaults for the model's family (``hparams/<method>/<family>.json``), plus overrides."""
        family = arch_for(model).family
        files = resources.files("factedit") / "hparams" / cls.method()
        candidate = files / f"{family}.json"
        if not candidate.is_file():
            raise FactEditError(f"no default {cls.method()} hyper-parameters for family {family!r}; pass a file")
        data = json.loads(candidate.read_text())
        data.update(overrides)
        hp = cls.from_dict(data, source=str(candidate))
        hp.check_model(model)
        return hp

    def check_model(self, model: nn.Module) -> None:
        for layer in getattr(self, "layers", []):
            check_layer(model, layer)

    def replace(self, **changes) -> HyperParams:
        return type(self).from_dict({**self.model_dump(), **changes})


class ValueOptimizationParams(HyperParams):
    """Settings of the v*/z optimisation shared by ROME and MEMIT."""

    v_num_grad_steps: int = Field(20, ge=1)
    v_lr: float = Field(0.5, gt=0)
    v_weight_decay: float = Field(0.5, ge=0)
    clamp_norm_factor: float = Field(4.0, gt=0)
    kl_factor: float = Field(0.0625, ge=0)
    early_stop_loss: float = Field(5e-2, ge=0)
    # Reuse the unchanged prefix of every prompt and compute logits only where the loss reads them.
    prefix_cache: bool = True


class ROMEHyperParams(ValueOptimizationParams):
    layers: list[int] = Field(min_length=1)
    fact_token: Literal["subject_last", "last"] = "subject_last"
    context_template_length_params: list[tuple[int, int]] = [(5, 10), (10, 10)]
    template_seed: int = 0
    mom2_adjustment: bool = True
    mom2_dataset: str | None = None  # corpus spec; None = the default local Wikipedia text
    mom2_n_tokens: int = Field(100_000, ge=1)
    mom2_max_length: int = Field(1024, ge=8)
    mom2_dtype: Literal["float32", "float64"] = "float32"
    # r-ROME (arXiv 2403.07175): use the template-averaged key in the update too. False = original ROME.
    consistent_key: bool = True

    @classmethod
    def method(cls) -> str:
        return "rome"

    @field_validator("layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("layers must be distinct")
        return sorted(v)


class MEMITHyperParams(ValueOptimizationParams):
    """MEMIT (kmeng01/memit ``hparams/MEMIT/*.json``): z at the last layer, update spread over ``layers``."""

    layers: list[int] = Field(min_length=1)
    fact_token: Literal["subject_last", "last"] = "subject_last"
    clamp_norm_factor: float = Field(0.75, gt=0)
    context_template_length_params: list[tuple[int, int]] = [(10, 5)]
    template_starts: list[str] = ["The", "Therefore", "Because", "I", "You"]
    template_seed: int = 0
    mom2_update_weight: float = Field(15000.0, gt=0)  # lambda in (lambda C + K Kᵀ)
    mom2_dataset: str | None = None
    mom2_n_tokens: int = Field(100_000, ge=1)
    mom2_max_length: int = Field(1024, ge=8)
    mom2_dtype: Literal["float32", "float64"] = "float32"
    batch_size: int = Field(32, ge=1)  # requests whose z vectors are optimised together

    @classmethod
    def method(cls) -> str:
        return "memit"

    @field_validator("layers")
    @classmethod
    def _sorted_distinct(cls, v: list[int]) -> list[int]:
        """Edited in increasing order; z lives at the last one. (Need not be consecutive.)"""
        if len(set(v)) != len(v):
            raise ValueError("layers must be distinct")
        return sorted(v)


class AlphaEditHyperParams(MEMITHyperParams):
    """AlphaEdit (Fang et al. 2024, arXiv 2410.02355): MEMIT's z and keys, null-space projected update."""

    nullspace_threshold: float = Field(2e-2, gt=0)  # eigenvalues of C below this span the null space
    L2: float = Field(10.0, gt=0)  # > 0 keeps (P K Kᵀ + L2 I) invertible

    @classmethod
    def method(cls) -> str:
        return "alphaedit"
