"""A registry method bound to one evaluation run.

The run resolves the method's hyper-parameters once (they go into the manifest) and shares the
unedited model's statistics and context templates through one :class:`EditResources`, computed
before the first case so that no case's edit time includes them. Everything else (what a method
is, how it computes, what it can do) is the core registry's :mod:`factedit.editing.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.methods import Capabilities, EditMethod, MethodState, get_method
from factedit.editing.patch import Patch
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult
from factedit.progress import Progress


class RunMethod:
    """``method`` with the run's hyper-parameters ``hp`` and shared ``resources``."""

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        name: str,
        hparams: str | Path | dict | None = None,
        overrides: dict[str, Any] | None = None,
        *,
        resources: EditResources | None = None,
        progress: Progress | bool | None = None,
    ) -> None:
        self.method: EditMethod = get_method(name)
        self.name = self.method.name
        self.hp = self.method.hparams(model, hparams, overrides or None)
        self.resources = resources or EditResources(model, tok)
        self.progress = progress
        self._state: MethodState | None = None

    def prepare(self) -> None:
        """Compute the statistics and templates every edit shares, on the unedited model, before any
        case is timed (later lookups are memory hits)."""
        if self.hp is not None:
            self.resources.for_hparams(self.hp, self.progress)

    @property
    def capabilities(self) -> Capabilities:
        return self.method.capabilities

    @property
    def fact_token(self) -> str:
        """Where keys are read (decides which requests of one batch conflict)."""
        return getattr(self.hp, "fact_token", "subject_last")

    def manifest_hparams(self) -> dict[str, Any]:
        return self.hp.model_dump(mode="json") if self.hp is not None else {}

    def hparams_defaults(self) -> dict[str, Any]:
        """Defaults of the method's settings (see :meth:`HyperParams.defaults`), for resuming older runs."""
        return type(self.hp).defaults() if self.hp is not None else {}

    def batch_state(self) -> MethodState | None:
        """State for batches edited from the unedited model (made once; discarded after each batch)."""
        if self._state is None and self.capabilities.state:
            self._state = self.method.new_state(self.hp, self.resources, self.progress)
        return self._state

    def compute(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], **options: Any
    ) -> EditResult | None:
        """One edit of ``requests`` on the model as it is (left unchanged); ``None`` for no edit."""
        return self.method.compute(
            model, tok, list(requests), self.hp, resources=self.resources, state=self.batch_state(), **options
        )

    def compute_patch(self, model: nn.Module, tok: PreTrainedTokenizerBase, request: EditRequest) -> Patch | None:
        result = self.compute(model, tok, [request])
        return result.patch if result is not None else None

    def compute_each(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> list[Patch | None]:
        """Independent single edits of ``requests``, computed together where the method can."""
        results = self.method.compute_each(model, tok, list(requests), self.hp, resources=self.resources)
        return [r.patch if r is not None else None for r in results]

    def discard(self) -> None:
        """The last batch was reverted: its keys must not count as kept (AlphaEdit)."""
        if self._state is not None:
            self._state.discard()
