"""Hyper-parameters: one strict, validated object per method; defaults per measured model, else per family.

Defaults live in ``hparams/<method>/models/<registry name>.json`` (values measured on that model)
over ``hparams/<method>/<family>.json`` (the layer as a fraction of depth, resolved for the model
at hand); see :meth:`HyperParams.for_model`.

Names follow the official ROME code (kmeng01/rome ``hparams/ROME/*.json``) so
published settings can be read side by side. Module names are *not* here: they
come from the architecture table.

Every number is checked against a sane range (:data:`LIMITS`, one table for every method's class,
FT's included; a class with a number field that has no range cannot even be defined), infinities
and NaN are refused, and so are unknown keys: a setting that would silently give NaN weights
(``v_weight_decay: Infinity``) or hours of work (``v_num_grad_steps: 10**9``) is an error before
any work. ``mom2_n_tokens`` must be at least the number of features of the edited layer's input
(:meth:`HyperParams.check_model`): C = E[kkᵀ] estimated from fewer tokens than features has rank
below its size, so it is singular and C⁻¹k is meaningless.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, check_layer, get_parameter, math_shape, num_layers
from factedit.models.registry import registry_name
from factedit.paths import read_json_file


@dataclass(frozen=True)
class Range:
    """Allowed values of one number: ``low <= x <= high`` (``low < x`` when ``low_open``)."""

    low: float
    high: float
    low_open: bool = False

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def allows(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high


# The range of every number of every method's hyper-parameters, by field name (the official names mean
# the same in every method). Wide enough for any published setting, narrow enough to refuse a typo
# that would give NaN weights or days of work. The official values are in the comments.
LIMITS: dict[str, Range] = {
    "layers": Range(0, 1000),  # each layer; the model's own depth is checked in check_model
    "v_num_grad_steps": Range(1, 1000),  # ROME 20, MEMIT 25
    "v_lr": Range(0, 10, low_open=True),  # 0.5
    "v_weight_decay": Range(0, 100),  # 0.5 (ROME), 1e-3 (MEMIT)
    "clamp_norm_factor": Range(0, 100, low_open=True),  # 4 (ROME), 0.75 (MEMIT)
    "kl_factor": Range(0, 100),  # 0.0625
    "early_stop_loss": Range(0, 10),  # 0.05 (v*), 0.01 (FT)
    "template_seed": Range(0, 2**32 - 1),
    "mom2_n_tokens": Range(1, 10**9),  # 100,000; at least the layer's input features (check_model)
    "mom2_max_length": Range(8, 131_072),  # 1,024 (longer than a model's context only truncates less)
    "mom2_update_weight": Range(0, 1e9, low_open=True),  # 15,000 (GPT-J), 20,000 (GPT-2 XL)
    "batch_size": Range(1, 4096),  # 32 (MEMIT z), 128 (FT)
    "nullspace_threshold": Range(0, 1e6, low_open=True),  # 0.02
    "L2": Range(0, 1e9, low_open=True),  # 10
    "num_steps": Range(1, 10_000),  # FT 25
    "lr": Range(0, 1, low_open=True),  # FT 5e-4
    "weight_decay": Range(0, 100),  # FT 0
    "norm_constraint": Range(0, 10, low_open=True),  # FT-L 5e-4
    "key_fit_ridge": Range(0, 1e6, low_open=True),  # ROME key_fit="every_template": 0.01
    "emmet_lambda": Range(0, 1e9),  # EMMET 0.1 (added to Kᵀ C⁻¹ K)
    "update_norm_lambda": Range(0, 1e9),  # EMMET 0 (added to C)
    "value_norm_anchor": Range(0, 1e6, low_open=True),  # NAS: the measured mean |v*| (off by default)
    "value_norm_skip_factor": Range(1, 1e6),  # NAS 2 (MEMIT, AlphaEdit), 5 (ROME)
}
TEMPLATE_LENGTH = Range(1, 256)  # tokens per generated context template (ROME 5 and 10)
TEMPLATE_COUNT = Range(1, 100)  # templates of one length (ROME 10, MEMIT 5 per start)
MAX_TEMPLATE_STARTS = 100
MAX_START_CHARS = 200


def _numeric(annotation: Any) -> bool:
    """Whether a field holds a number (``int``, ``float``, optional or in a list)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return any(_numeric(a) for a in typing.get_args(annotation))
    return False


def _validation_line(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``field: problem (got value); ...``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error.get("loc", ()))
        kind, got = error.get("type"), error.get("input")
        if kind == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        elif kind == "missing":
            parts.append(f"{where!r} is required")
        else:
            message = error.get("msg", "invalid").removeprefix("Value error, ")
            shown = "" if not where or isinstance(got, dict) else f" (got {got!r:.60})"
            parts.append(f"{where}: {message}{shown}" if where else message)
    return "; ".join(parts)


def _distinct_sorted(layers: list[int]) -> list[int]:
    """Layers are edited in increasing order (MEMIT's z lives at the last); the same layer twice is an error."""
    if len(set(layers)) != len(layers):
        raise ValueError("layers must be distinct")
    return sorted(layers)


# The layer list of every method's hyper-parameters: at least one, distinct, sorted (need not be consecutive).
Layers = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct_sorted)]


def stats_features(model: nn.Module, layers: list[int]) -> int:
    """The largest number of input features among the rewrite modules at ``layers`` (the size of C)."""
    arch = arch_for(model)
    weights = [get_parameter(model, arch.rewrite_weight_at(check_layer(model, layer))) for layer in layers]
    return max(int(math_shape(w, arch)[1]) for w in weights)


def check_stats_tokens(model: nn.Module, layers: list[int], n_tokens: int, name: str = "the token count") -> None:
    """Refuse a statistics sample smaller than the number of features: C = E[kkᵀ] from n tokens has rank at
    most n, so with fewer tokens than features it is singular and C⁻¹k (ROME) or the null space
    (AlphaEdit) is meaningless."""
    features = stats_features(model, layers)
    if n_tokens < features:
        raise FactEditError(
            f"{name} {n_tokens:,} is below the {features:,} features of the edited layer's input: C = E[kkᵀ] "
            f"from fewer tokens than features is singular; use at least {features:,} (the default is 100,000)"
        )


class StatsSpec(BaseModel):
    """What a second moment C = E[kkᵀ] is computed from (one cache entry per spec and weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str | None = None  # corpus spec; None = the default local Wikipedia text
    n_tokens: int = Field(100_000, ge=1, le=10**9)
    max_length: int = Field(1024, ge=8, le=131_072)
    dtype: Literal["float32", "float64"] = "float32"


class TemplateSpec(BaseModel):
    """How the context templates are generated (seeded, so one spec and weights give one list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    seed: int = 0
    starts: tuple[str, ...] | None = None


class HyperParams(BaseModel):
    """Base: unknown keys are errors, values are type-checked, numbers finite and in :data:`LIMITS`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A method's class may not add a number without a range: every number is bounded."""
        super().__pydantic_init_subclass__(**kwargs)
        unbounded = [n for n, f in cls.model_fields.items() if _numeric(f.annotation) and n not in LIMITS]
        if unbounded:
            raise TypeError(f"{cls.__name__}: give {', '.join(unbounded)} a range in factedit.editing.hparams.LIMITS")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default of every setting that has one (JSON values, as a run's manifest stores them).

        Why: a run whose manifest predates a setting was made with its default, as new settings are
        added with defaults that keep the old behaviour."""
        fields = cls.model_fields.items()
        found = {k: f.get_default(call_default_factory=True) for k, f in fields if not f.is_required()}
        return json.loads(json.dumps(found, default=str))

    @model_validator(mode="after")
    def _within_limits(self) -> HyperParams:
        for name in type(self).model_fields:
            limit = LIMITS.get(name)
            value = getattr(self, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if limit is not None and isinstance(v, (int, float)) and not limit.allows(v):
                    label = "layer" if name == "layers" else name
                    raise ValueError(f"{label} {v!r} is out of range: {name} must be in {limit}")
        pairs = getattr(self, "context_template_length_params", None) or []
        for length, count in pairs:
            if not TEMPLATE_LENGTH.allows(length) or not TEMPLATE_COUNT.allows(count):
                raise ValueError(
                    f"context_template_length_params: each [length, count] needs a length in {TEMPLATE_LENGTH} "
                    f"and a count in {TEMPLATE_COUNT}, got [{length}, {count}]"
                )
        starts = getattr(self, "template_starts", None)
        if starts is not None:
            if not starts or len(starts) > MAX_TEMPLATE_STARTS:
                raise ValueError(f"template_starts must hold 1 to {MAX_TEMPLATE_STARTS} texts")
            if any(not s.strip() or len(s) > MAX_START_CHARS or "{" in s or "}" in s for s in starts):
                raise ValueError(
                    f"template_starts must be non-blank texts of at most {MAX_START_CHARS} characters, without braces"
                )
        return self

    @classmethod
    def method(cls) -> str:
        raise NotImplementedError

    @classmethod
    def from_json(cls, path: str | Path) -> HyperParams:
        path = Path(path)
        return cls.from_dict(read_json_file(path, f"{cls.method()} hyper-parameter file"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> HyperParams:
        if not isinstance(data, dict):
            found = "null" if data is None else type(data).__name__
            raise FactEditError(
                f"{cls.method()} hyper-parameters in {source} must be a JSON object of settings, not {found}"
            )
        data = {k: v for k, v in data.items() if not str(k).startswith("_")}  # "_comment" keys document files
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = _validation_line(exc)
            raise FactEditError(f"invalid {cls.method()} hyper-parameters in {source}: {problems}") from None

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
        """Checks that need the model: the layers exist, and the statistics sample has at least as many
        tokens as the edited layers' inputs have features (else C is singular)."""
        for layer in getattr(self, "layers", []):
            check_layer(model, layer)
        spec = self.stats_spec
        if spec is not None:
            check_stats_tokens(model, self.layers, spec.n_tokens, "mom2_n_tokens")

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
    # NAS, Norm-Anchor Scaling (Liu et al. 2026, arXiv 2602.02543; SasyaTitech/NAS): once optimised, the
    # value vector (the edited layer's MLP output v* = v₀ + δ) is rescaled to this norm, the mean |v*| of
    # edits solved on the *unedited* model (measure it with ``values.reference_value_norm``), which breaks
    # the norm feedback loop of long edit sequences. None = off (the methods as published).
    value_norm_anchor: float | None = Field(None, gt=0)
    # NAS drops an edit (δ = 0) whose solved |v*| exceeds this many anchors (official: 2 for MEMIT and
    # AlphaEdit, 5 for ROME); None = rescale every edit. Read only when value_norm_anchor is set.
    value_norm_skip_factor: float | None = Field(2.0, ge=1)


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
    # How k* averages the keys over the context templates: "templates" = every template alike (official
    # ROME's compute_u: the bare prompt is 1 of 21); "context_types" = within each context type, then over
    # the types (official MEMIT's compute_ks: the bare prompt is 1 of 3 types).
    key_average: Literal["templates", "context_types"] = "templates"
    # What the v* optimisation adds at each prompt's subject: "injected" = the same change at every prompt
    # (ROME, r-ROME); "applied" = the change the rank-one update will really make there, which scales with
    # that prompt's key (k_iᵀu / kᵀu), so v* is fitted to the edit that is applied (factedit, see rome.py).
    value_objective: Literal["injected", "applied"] = "injected"
    # Which direction u the rank-one update reads keys along: "mean" = C⁻¹k* (ROME); "every_template" =
    # the least-C-norm u with uᵀkᵢ ≈ uᵀk* for every template's key kᵢ (ridge ``key_fit_ridge``, relative to
    # the mean of diag(KᵀC⁻¹K)), so that every context, the bare prompt included, gets the change v* was
    # optimised for (factedit, see rome.py). As the ridge grows, u tends to ROME's direction. The default since
    # CounterFact dev-500 (ES 99.4 against 97.4 with "mean") and 200 sequential edits (earlier edits holding 0.97)
    # measured it; rome-original keeps "mean", the official code's u.
    key_fit: Literal["mean", "every_template"] = "every_template"
    key_fit_ridge: float = 0.01
    value_norm_skip_factor: float | None = Field(5.0, ge=1)  # NAS's ROME threshold (official compute_v)

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


class EMMETHyperParams(MEMITHyperParams):
    """EMMET (Gupta et al. 2024, arXiv 2403.14236; scalable-model-editing/unified-model-editing
    ``hparams/EMMET/*.json``): MEMIT's z, keys and layer spreading, with every edit an equality constraint."""

    mom2_update_weight: float = Field(1.0, gt=0)  # C is scaled by this (official: 1, gpt2-xl 1000)
    emmet_lambda: float = Field(0.1, ge=0)  # added to D = Kᵀ C⁻¹ K when the batch has more than one edit
    update_norm_lambda: float = Field(0.0, ge=0)  # added to C (a penalty on the update's norm)

    @classmethod
    def method(cls) -> str:
        return "emmet"


class UltraEditHyperParams(HyperParams):
    """UltraEdit (Gu et al., TMLR 2026, arXiv 2505.14679; XiaojieGu/UltraEdit ``config/editor/ultraedit.yaml``):
    one gradient per fact, lifelong-normalised, turned into a weight change by ridge regression."""

    layers: Layers
    # which of each layer's MLP weights are edited: "output" the rewrite module (MLP output projection, as
    # ROME/MEMIT; the official Mistral, GPT-J and Phi-4 runs), "input" its input projections (gate and up on
    # Llama-style models; the official Llama 3, Qwen2.5 and Gemma 3 runs)
    modules: Literal["output", "input"] = "output"
    # Keys are read where the target is predicted: the prompt's last token and the target's own tokens,
    # so requests conflict as with MEMIT's fact_token="last" (the same prompt, different targets).
    fact_token: Literal["last"] = "last"
    lr: float = Field(1e-6, gt=0)  # scales the pseudo value: v = -lr · |k̂|² · ĝ
    L2: float = Field(1.0, gt=0)  # ridge term of (KᵀK + L2 I); the official code adds the identity
    batch_size: int = Field(10, ge=1)  # requests per forward/backward (official dataset.batch_size 10)

    @classmethod
    def method(cls) -> str:
        return "ultraedit"
