"""The one registry of editing methods, used by every front end (CLI, web app, evaluation, sequences).

A method turns requests into an :class:`~factedit.editing.result.EditResult` computed on the model as
it is (the model is left unchanged), with hyper-parameters resolved the same way everywhere: a file,
a dict or an object, else the defaults for the model, then overrides. What a method can do is stated
in its :class:`Capabilities`, never probed with ``hasattr``.

Adding a method is one module with its compute function plus one :func:`register` call here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.ft import FTHyperParams, FTLHyperParams
from factedit.editing.hparams import (
    AlphaEditHyperParams,
    EMMETHyperParams,
    HyperParams,
    MEMITHyperParams,
    ROMEHyperParams,
    UltraEditHyperParams,
)
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult
from factedit.errors import FactEditError
from factedit.progress import Progress

HParamsSource = str | Path | dict[str, Any] | HyperParams | None


@dataclass(frozen=True)
class Capabilities:
    """``batch``: many requests in one patch; ``sequential``: can edit batch after batch an edited model;
    ``state``: carries state from one step of a sequence to the next (saved with ``state_dict``);
    ``each``: computes the independent single edits of several requests together (faster, same result);
    ``sharded``: under torchrun, splits one batch's work (z, keys) between the processes (docs/distributed.md);
    the other methods edit on rank 0 alone."""

    batch: bool = False
    sequential: bool = True
    state: bool = False
    each: bool = False
    sharded: bool = False


class MethodState(Protocol):
    """State a method carries along a sequence (AlphaEdit: the keys of the edits already kept)."""

    def commit(self) -> None: ...  # the last computed patch was applied and stays

    def discard(self) -> None: ...  # the last computed patch was not kept

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...


class EditMethod:
    """Base class: a named method with its hyper-parameter class and capabilities."""

    name: str = ""
    description: str = ""
    hparams_class: type[HyperParams] | None = None
    capabilities = Capabilities()

    # -- hyper-parameters ------------------------------------------------------------------
    def hparams(
        self, model: nn.Module, source: HParamsSource = None, overrides: dict[str, Any] | None = None
    ) -> HyperParams | None:
        """Resolve hyper-parameters: ``source`` (file, dict or object) else the model's defaults, then
        ``overrides``; checked against the model (layers exist)."""
        cls = self.hparams_class
        if cls is None:
            if source or overrides:
                raise FactEditError(f"method {self.name!r} takes no hyper-parameters")
            return None
        if source is None:
            hp = cls.for_model(model)
        elif isinstance(source, HyperParams):
            if not isinstance(source, cls):
                raise FactEditError(f"method {self.name!r} needs {cls.__name__}, not {type(source).__name__}")
            hp = source
        elif isinstance(source, dict):
            hp = cls.from_dict(source)
        else:
            hp = cls.from_json(source)
        hp = self._fixed(hp)
        if overrides:
            hp = self._fixed(hp.replace(**overrides))
        hp.check_model(model)
        return hp

    def check_source(self, source: HParamsSource = None) -> None:
        """Check a hyper-parameter file, dict or object without a model (before one is loaded): an
        unreadable file, unknown keys or out-of-range values fail at once; what needs the model (do the
        layers exist?) is checked by :meth:`hparams`."""
        cls = self.hparams_class
        if source is None:
            return
        if cls is None:
            raise FactEditError(f"method {self.name!r} takes no hyper-parameters")
        if isinstance(source, HyperParams):
            if not isinstance(source, cls):
                raise FactEditError(f"method {self.name!r} needs {cls.__name__}, not {type(source).__name__}")
            hp = source
        else:
            hp = cls.from_dict(source) if isinstance(source, dict) else cls.from_json(source)
        self._fixed(hp)

    def _fixed(self, hp: HyperParams) -> HyperParams:
        """Settings the method's name implies (e.g. rome-original = no consistent key)."""
        return hp

    # -- computing ---------------------------------------------------------------------------
    def check_requests(self, requests: Sequence[EditRequest], hp: HyperParams | None) -> list[EditRequest]:
        """The requests one ``compute`` call takes, checked before any work (conflicts, batch size)."""
        requests = list(requests)
        if not requests:
            raise FactEditError("no edit requests")
        if not self.capabilities.batch and len(requests) != 1:
            raise FactEditError(
                f"{self.name} edits one request at a time (got {len(requests)}): use a batch method "
                f"({', '.join(batch_method_names())}) or a sequence"
            )
        return requests

    def compute(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hp: HyperParams | None,
        *,
        resources: EditResources | None = None,
        state: MethodState | None = None,
        progress: Progress | bool | None = None,
        **options: Any,
    ) -> EditResult | None:
        raise NotImplementedError

    def compute_each(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hp: HyperParams | None,
        **keywords: Any,
    ) -> list[EditResult | None]:
        """Independent single edits of each request (each as if alone, on the model as it is);
        ``keywords`` are :meth:`compute`'s (``resources``, ``progress``)."""
        return [self.compute(model, tok, [r], hp, **keywords) for r in requests]

    def new_state(
        self, hp: HyperParams | None, resources: EditResources, progress: Progress | bool | None = None
    ) -> MethodState | None:
        """Fresh state for a sequence (``None`` for stateless methods)."""
        return None


class NoEdit(EditMethod):
    name = "none"
    description = "no edit (the unedited model's row)"
    capabilities = Capabilities(batch=True)

    def compute(self, model, tok, requests, hp, *, resources=None, state=None, progress=None, **options):
        self.check_requests(requests, hp)
        return None


class Rome(EditMethod):
    """ROME (arXiv 2202.05262); ``consistent_key`` = r-ROME's fix (arXiv 2403.07175)."""

    hparams_class = ROMEHyperParams

    def __init__(self, consistent_key: bool) -> None:
        self.consistent_key = consistent_key
        self.name, self.description = (
            ("rome", "ROME with r-ROME's consistent key")
            if consistent_key
            else ("rome-original", "ROME as in the original code (bare prompt's key in the update, u = C⁻¹k*)")
        )

    def _fixed(self, hp):
        # rome-original is the original code: the bare prompt's key in the update and u = C⁻¹k* (its compute_u)
        implied = {"consistent_key": True} if self.consistent_key else {"consistent_key": False, "key_fit": "mean"}
        return hp if all(getattr(hp, k) == v for k, v in implied.items()) else hp.replace(**implied)

    def compute(self, model, tok, requests, hp, *, resources=None, state=None, progress=None, **options):
        from factedit.editing.rome import compute_rome

        (request,) = self.check_requests(requests, hp)
        return compute_rome(model, tok, request, hp, resources=resources, progress=progress, **options)


class Memit(EditMethod):
    """MEMIT (arXiv 2210.07229): many requests in one patch over several layers."""

    name = "memit"
    description = "MEMIT: a batch of edits spread over several layers"
    hparams_class = MEMITHyperParams
    capabilities = Capabilities(batch=True, sharded=True)

    def check_requests(self, requests, hp):
        from factedit.editing.memit import check_batch

        return check_batch(list(requests), hp.fact_token if hp is not None else "subject_last")

    def compute(self, model, tok, requests, hp, *, resources=None, state=None, progress=None, **options):
        return self._compute_function()(
            model, tok, self.check_requests(requests, hp), hp, resources=resources, progress=progress, **options
        )

    def _compute_function(self):
        """The compute function of this member of MEMIT's family (imported on first use: torch-free listing)."""
        from factedit.editing.memit import compute_memit

        return compute_memit


class AlphaEdit(Memit):
    """AlphaEdit (arXiv 2410.02355): MEMIT's update projected onto the null space of preserved keys."""

    name = "alphaedit"
    description = "AlphaEdit: MEMIT projected onto the null space of preserved knowledge (sequences)"
    hparams_class = AlphaEditHyperParams
    capabilities = Capabilities(batch=True, state=True, sharded=True)

    def new_state(self, hp, resources, progress=None):
        from factedit.editing.alphaedit import AlphaEditState

        return AlphaEditState(resources.second_moments(hp.layers, hp.stats_spec, progress), hp)

    def compute(self, model, tok, requests, hp, *, resources=None, state=None, progress=None, **options):
        from factedit.editing.alphaedit import compute_alphaedit

        return compute_alphaedit(
            model,
            tok,
            self.check_requests(requests, hp),
            hp,
            state=state,
            resources=resources,
            progress=progress,
            **options,
        )


class Emmet(Memit):
    """EMMET (arXiv 2403.14236): MEMIT's z and keys, every edit of the batch an equality constraint."""

    name = "emmet"
    description = "EMMET: batched ROME, every edit of the batch an equality constraint"
    hparams_class = EMMETHyperParams
    capabilities = Capabilities(batch=True, sharded=True)

    def _compute_function(self):
        from factedit.editing.emmet import compute_emmet

        return compute_emmet


class UltraEdit(EditMethod):
    """UltraEdit (arXiv 2505.14679): one normalised gradient per fact, closed-form update, lifelong statistics."""

    name = "ultraedit"
    description = "UltraEdit: one gradient pass per batch, lifelong-normalised closed-form update (sequences)"
    hparams_class = UltraEditHyperParams
    capabilities = Capabilities(batch=True, state=True)
    # what other methods take and UltraEdit has no use for: no templates, statistics or z vectors
    UNUSED_OPTIONS = ("templates", "second_moment", "z_cache", "corpus")

    def check_requests(self, requests, hp):
        from factedit.editing.memit import check_batch

        return check_batch(list(requests), "last")

    def new_state(self, hp, resources, progress=None):
        from factedit.editing.ultraedit import UltraEditState

        return UltraEditState()

    def compute(self, model, tok, requests, hp, *, resources=None, state=None, progress=None, **options):
        from factedit.editing.ultraedit import compute_ultraedit

        for unused in self.UNUSED_OPTIONS:
            options.pop(unused, None)
        return compute_ultraedit(
            model, tok, self.check_requests(requests, hp), hp, state=state, progress=progress, **options
        )


class FineTune(EditMethod):
    """FT / FT-L (the ROME paper's baselines): fine-tune the rewrite weight on the edit prompt."""

    def __init__(self, constrained: bool) -> None:
        self.constrained = constrained
        self.name, self.description, self.hparams_class = (
            ("ft-l", "FT-L: fine-tuning with an L-inf bound on the change", FTLHyperParams)
            if constrained
            else ("ft", "FT: unconstrained fine-tuning of one layer", FTHyperParams)
        )
        self.capabilities = Capabilities(each=True)

    def _fixed(self, hp):
        if self.constrained and hp.norm_constraint is None:
            raise FactEditError("ft-l needs a norm_constraint; use method 'ft' for unconstrained fine-tuning")
        return hp

    def compute(self, model, tok, requests, hp, *, resources=None, state=None, progress=None, **options):
        from factedit.editing.ft import compute_ft

        return compute_ft(model, tok, self.check_requests(requests, hp), hp, progress=progress)

    def compute_each(self, model, tok, requests, hp, **keywords):
        from factedit.editing.ft import compute_ft_each

        if hp.weight_decay or next(model.parameters()).dtype != torch.float32:  # see compute_ft_each
            return super().compute_each(model, tok, requests, hp, **keywords)
        return compute_ft_each(model, tok, list(requests), hp)


METHODS: dict[str, EditMethod] = {}


def register(method: EditMethod) -> EditMethod:
    """Make ``method`` available everywhere (``--method NAME`` in the CLI, the web app, evaluation)."""
    if not method.name:
        raise ValueError("a method needs a name")
    METHODS[method.name] = method
    return method


for _method in (
    NoEdit(),
    Rome(consistent_key=True),
    Rome(consistent_key=False),
    Memit(),
    AlphaEdit(),
    FineTune(constrained=False),
    FineTune(constrained=True),
    Emmet(),
    UltraEdit(),
):
    register(_method)


def method_names() -> list[str]:
    return list(METHODS)


def batch_method_names() -> list[str]:
    """The methods that edit many requests in one patch (for error messages that suggest one)."""
    return [n for n, m in METHODS.items() if m.capabilities.batch and n != "none"]


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise FactEditError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
