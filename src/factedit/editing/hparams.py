"""Hyper-parameters: one strict, validated object per method; defaults per measured model, else per family.

Defaults live in ``hparams/<method>/models/<registry name>.json`` (values measured on that model)
over ``hparams/<method>/<family>.json`` (the layer as a fraction of depth, resolved for the model
at hand); see :meth:`HyperParams.for_model`.

Names follow the official ROME code (kmeng01/rome ``hparams/ROME/*.json``) so
published settings can be read side by side. Module names are *not* here: they
come from the architecture table.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, check_layer, num_layers
from factedit.models.registry import registry_name


def _distinct_sorted(layers: list[int]) -> list[int]:
    """Layers are edited in increasing order (MEMIT's z lives at the last); the same layer twice is an error."""
    if len(set(layers)) != len(layers):
        raise ValueError("layers must be distinct")
    return sorted(layers)


# The layer list of every method's hyper-parameters: at least one, distinct, sorted (need not be consecutive).
Layers = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct_sorted)]


class StatsSpec(BaseModel):
    """What a second moment C = E[kkᵀ] is computed from (one cache entry per spec and weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str | None = None  # corpus spec; None = the default local Wikipedia text
    n_tokens: int = Field(100_000, ge=1)
    max_length: int = Field(1024, ge=8)
    dtype: Literal["float32", "float64"] = "float32"


class TemplateSpec(BaseModel):
    """How the context templates are generated (seeded, so one spec and weights give one list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    seed: int = 0
    starts: tuple[str, ...] | None = None


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
        """Defaults for this model, then ``overrides`` (which win).

        Values come from the family file ``hparams/<method>/<family>.json``, over which a registry
        model's own file ``hparams/<method>/models/<name>.json`` (measured values) is laid. A family file
        gives the layer as a fraction of depth (``layer_fraction``; with ``layer_count`` for a run of
        consecutive layers ending there), so one file fits models of any depth; the integer layers are
        resolved here, for this model. A later source that names ``layers`` replaces an earlier fraction
        and vice versa. The fraction keys never reach the strict pydantic object.
        """
        family = arch_for(model).family
        folder = resources.files("factedit") / "hparams" / cls.method()
        family_file = folder / f"{family}.json"
        if not family_file.is_file():
            raise FactEditError(f"no default {cls.method()} hyper-parameters for family {family!r}; pass a file")
        sources: list[tuple[str, dict]] = [(str(family_file), cls._read_defaults(family_file))]
        name = registry_name(model)
        model_file = folder / "models" / f"{name}.json"
        if name is not None and model_file.is_file():
            sources.append((str(model_file), cls._read_defaults(model_file)))
        sources.append(("overrides", dict(overrides)))

        fraction_keys = ("layer_fraction", "layer_count")
        data: dict = {}
        layers_from = ""
        for where, values in sources:
            if "layers" in values:
                for key in fraction_keys:
                    data.pop(key, None)
            elif any(key in values for key in fraction_keys):
                data.pop("layers", None)
            data.update(values)
            if "layers" in values or any(key in values for key in fraction_keys):
                layers_from = where
        if "layers" not in data and "layer_fraction" in data:
            data["layers"] = cls._layers_at_fraction(
                data["layer_fraction"], data.get("layer_count", 1), num_layers(model), source=layers_from
            )
        for key in fraction_keys:
            data.pop(key, None)
        hp = cls.from_dict(data, source=" + ".join(where for where, values in sources if values))
        hp.check_model(model)
        return hp

    @staticmethod
    def _read_defaults(file: Traversable) -> dict:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FactEditError(f"cannot read default hyper-parameters {file}: {exc}") from exc
        if not isinstance(data, dict):
            raise FactEditError(f"default hyper-parameters {file} must be a JSON object")
        return data

    @staticmethod
    def _layers_at_fraction(fraction, count, depth: int, *, source: str) -> list[int]:
        """``count`` consecutive layers ending at round(fraction x depth), kept inside 0..depth-1."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise FactEditError(f"layer_fraction must be a number in [0, 1], got {fraction!r} ({source})")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise FactEditError(f"layer_count must be a whole number >= 1, got {count!r} ({source})")
        last = min(depth - 1, int(fraction * depth + 0.5))  # round half up: no banker's rounding surprises
        return list(range(max(0, last - count + 1), last + 1))

    def check_model(self, model: nn.Module) -> None:
        for layer in getattr(self, "layers", []):
            check_layer(model, layer)

    def replace(self, **changes) -> HyperParams:
        return type(self).from_dict({**self.model_dump(), **changes})

    # The files keep the official flat names (mom2_*, context_template_*), so published settings can be
    # read side by side; the resources cache is keyed by these nested specs built from them.
    @property
    def stats_spec(self) -> StatsSpec | None:
        """The second-moment spec, or ``None`` when the method uses no statistics."""
        if not hasattr(self, "mom2_n_tokens") or not getattr(self, "mom2_adjustment", True):
            return None
        return StatsSpec(
            corpus=self.mom2_dataset,
            n_tokens=self.mom2_n_tokens,
            max_length=self.mom2_max_length,
            dtype=self.mom2_dtype,
        )

    @property
    def template_spec(self) -> TemplateSpec | None:
        """The context-template spec, or ``None`` when the method uses no templates."""
        if not hasattr(self, "context_template_length_params"):
            return None
        starts = getattr(self, "template_starts", None)
        return TemplateSpec(
            length_params=tuple(tuple(p) for p in self.context_template_length_params),
            seed=self.template_seed,
            starts=tuple(starts) if starts is not None else None,
        )


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
    layers: Layers
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


class MEMITHyperParams(ValueOptimizationParams):
    """MEMIT (kmeng01/memit ``hparams/MEMIT/*.json``): z at the last layer, update spread over ``layers``."""

    layers: Layers
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


class AlphaEditHyperParams(MEMITHyperParams):
    """AlphaEdit (Fang et al. 2024, arXiv 2410.02355): MEMIT's z and keys, null-space projected update."""

    nullspace_threshold: float = Field(2e-2, gt=0)  # eigenvalues of C below this span the null space
    L2: float = Field(10.0, gt=0)  # > 0 keeps (P K Kᵀ + L2 I) invertible

    @classmethod
    def method(cls) -> str:
        return "alphaedit"
