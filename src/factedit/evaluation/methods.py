"""Editing methods the evaluation runner can call, by name: a small registry.

A method is set up once per run (hyper-parameters resolved, statistics and templates
precomputed) and then turns one request into a :class:`Patch` computed on the unedited
model (or ``None`` for no edit). Batch methods (MEMIT, AlphaEdit) also turn a list of requests
into one patch (``compute_batch``); ``commit`` tells a method that its last patch was applied and
stays (AlphaEdit then keeps those keys for the next batch of a sequence). Methods whose edits can be
computed for several requests at once, each as if alone, offer ``compute_each`` (FT, FT-L: the
runner's ``group``). To add one::

    register_method("my-method", MyMethod)   # a class with the EditMethod interface
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams, ROMEHyperParams
from factedit.editing.patch import Patch
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError

log = logging.getLogger(__name__)


class EditMethod(Protocol):
    """What the runner needs from a method."""

    name: str

    def setup(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: str | Path | dict | None = None,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resolve hyper-parameters (file, dict or family defaults, plus overrides) and precompute what
        every edit shares; returns the hyper-parameters as a JSON-able dict for the run manifest."""
        ...

    def compute(self, model: nn.Module, tok: PreTrainedTokenizerBase, request: EditRequest) -> Patch | None:
        """The edit for one request, computed on the unedited model, which is left unchanged."""
        ...


def _resolve(cls: type[HyperParams], model: nn.Module, hparams, overrides: dict[str, Any] | None) -> HyperParams:
    if hparams is None:
        hp = cls.for_model(model)
    elif isinstance(hparams, dict):
        hp = cls.from_dict(hparams)
    else:
        hp = cls.from_json(hparams)
    if overrides:
        hp = hp.replace(**overrides)
    hp.check_model(model)
    return hp


class NoEdit:
    """The unedited model (the ``pre`` row)."""

    name = "none"

    def setup(self, model, tok, hparams=None, overrides=None) -> dict[str, Any]:
        if hparams or overrides:
            raise FactEditError("method 'none' takes no hyper-parameters")
        return {}

    def compute(self, model, tok, request) -> Patch | None:
        return None


class RomeMethod:
    """ROME with the second moment and context templates computed once per run (both cached on disk)."""

    name = "rome"

    def __init__(self) -> None:
        self.hp: ROMEHyperParams | None = None
        self.moments: dict[int, Any] | None = None
        self.templates: list[str] | None = None

    def setup(self, model, tok, hparams=None, overrides=None) -> dict[str, Any]:
        from factedit.editing.templates import context_templates
        from factedit.models.fingerprint import model_fingerprint
        from factedit.stats.second_moment import second_moments

        self.hp = _resolve(ROMEHyperParams, model, hparams, overrides)
        if self.hp.mom2_adjustment:
            self.moments = second_moments(model, tok, self.hp.layers, corpus=self.hp.mom2_dataset,
                                          n_tokens=self.hp.mom2_n_tokens, max_length=self.hp.mom2_max_length,
                                          dtype=self.hp.mom2_dtype, progress=True)
        self.templates = context_templates(model, tok, self.hp.context_template_length_params,
                                           seed=self.hp.template_seed, fingerprint=model_fingerprint(model))
        return self.hp.model_dump(mode="json")

    def compute(self, model, tok, request) -> Patch:
        from factedit.editing.rome import compute_rome

        patch, _ = compute_rome(model, tok, request, self.hp, second_moment=self.moments, templates=self.templates)
        return patch


class FTMethod:
    """FT (``constrained=False``) or FT-L: fine-tune the rewrite weight on the edit prompt."""

    def __init__(self, constrained: bool = False) -> None:
        self.constrained = constrained
        self.name = "ft-l" if constrained else "ft"
        self.hp = None

    def setup(self, model, tok, hparams=None, overrides=None) -> dict[str, Any]:
        from factedit.editing.ft import FTHyperParams, FTLHyperParams

        self.hp = _resolve(FTLHyperParams if self.constrained else FTHyperParams, model, hparams, overrides)
        if self.constrained and self.hp.norm_constraint is None:
            raise FactEditError("ft-l needs a norm_constraint; use method 'ft' for unconstrained fine-tuning")
        return self.hp.model_dump(mode="json")

    def compute(self, model, tok, request) -> Patch:
        from factedit.editing.ft import compute_ft

        patch, _ = compute_ft(model, tok, request, self.hp)
        return patch

    def compute_each(self, model, tok, requests: list[EditRequest]) -> list[Patch]:
        """Independent edits of several requests in one pass (see ``compute_ft_each``)."""
        from factedit.editing.ft import compute_ft_each

        if self.hp.weight_decay or next(model.parameters()).dtype != torch.float32:
            return [self.compute(model, tok, r) for r in requests]  # see compute_ft_each
        return [patch for patch, _ in compute_ft_each(model, tok, requests, self.hp)]


class MemitMethod:
    """MEMIT (or AlphaEdit, ``alpha=True``): statistics of all critical layers and templates computed once."""

    def __init__(self, alpha: bool = False) -> None:
        self.alpha = alpha
        self.name = "alphaedit" if alpha else "memit"
        self.hp = None
        self.moments: dict[int, Any] | None = None
        self.templates: list[str] | None = None
        self.state = None  # AlphaEdit: projections and the keys of edits already kept

    def setup(self, model, tok, hparams=None, overrides=None) -> dict[str, Any]:
        from factedit.editing.hparams import AlphaEditHyperParams, MEMITHyperParams
        from factedit.editing.templates import context_templates
        from factedit.models.fingerprint import model_fingerprint
        from factedit.stats.second_moment import second_moments

        self.hp = _resolve(AlphaEditHyperParams if self.alpha else MEMITHyperParams, model, hparams, overrides)
        self.moments = second_moments(model, tok, self.hp.layers, corpus=self.hp.mom2_dataset,
                                      n_tokens=self.hp.mom2_n_tokens, max_length=self.hp.mom2_max_length,
                                      dtype=self.hp.mom2_dtype, progress=True)
        self.templates = context_templates(model, tok, self.hp.context_template_length_params,
                                           seed=self.hp.template_seed, starts=self.hp.template_starts,
                                           fingerprint=model_fingerprint(model))
        if self.alpha:
            from factedit.editing.alphaedit import AlphaEditState

            self.state = AlphaEditState({layer: self.moments[layer] for layer in self.hp.layers}, self.hp)
        return self.hp.model_dump(mode="json")

    def compute(self, model, tok, request) -> Patch:
        return self.compute_batch(model, tok, [request])

    def compute_batch(self, model, tok, requests: list[EditRequest], progress: bool = False,
                      z_cache: Path | None = None) -> Patch:
        from factedit.editing.memit import compute_memit

        return compute_memit(model, tok, requests, self.hp, second_moment=self.moments, templates=self.templates,
                             progress=progress, solver=self.state, method=self.name, z_cache=z_cache)

    def commit(self) -> None:
        if self.state is not None:
            self.state.commit()

    def discard(self) -> None:
        """Forget the keys of a patch that was computed but reverted (edits from the unedited model)."""
        if self.state is not None:
            self.state._pending.clear()

    def state_tensors(self) -> dict[str, Any]:
        """What a resumed sequence needs besides the applied patches (AlphaEdit's kept keys)."""
        if self.state is None:
            return {}
        return {f"previous.{layer}": kk for layer, kk in self.state.previous.items()}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.previous = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("previous.")}


METHODS: dict[str, Callable[[], EditMethod]] = {
    "none": NoEdit,
    "rome": RomeMethod,
    "ft": lambda: FTMethod(constrained=False),
    "ft-l": lambda: FTMethod(constrained=True),
    "memit": MemitMethod,
    "alphaedit": lambda: MemitMethod(alpha=True),
}


def register_method(name: str, factory: Callable[[], EditMethod]) -> None:
    """Make ``factory()`` available to the runner and the CLI as ``--method name``."""
    METHODS[name] = factory


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise FactEditError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]()
