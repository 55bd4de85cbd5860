"""The web app's state: one loaded model, its patch stack and shared edit resources, and the jobs' work on it.

The HTTP layer (``app.py``) validates requests and queues these methods as jobs; the work itself is
the library's: :func:`~factedit.editing.report.edit_and_compare` edits and compares,
:class:`~factedit.editing.patch.PatchStack` applies and reverts (newest first, bit-exact),
:class:`~factedit.editing.resources.EditResources` keeps statistics and templates. Model access is
serialised by ``lock``: the job worker holds it for a whole job, quick synchronous reads (top-k
predictions) wait for it a few seconds at most and otherwise answer "busy".
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams
from factedit.editing.patch import Patch, PatchStack
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, num_layers
from factedit.models.fingerprint import model_fingerprint, model_identity
from factedit.models.registry import DEFAULT_MODEL, REGISTRY, gguf_parts
from factedit.text import as_template
from factedit.web.edits import edit_defaults, edit_method_names, method_catalogue, report_json, resolve_hparams
from factedit.web.jobs import JobProgress, Reporter
from factedit.web.patches import Conflict, PatchListing, check_upload, new_patch_id, parse_upload

log = logging.getLogger(__name__)

__all__ = ["Busy", "Conflict", "ModelSession", "fill_prompt", "installed_models"]


class Busy(Exception):
    """The model is in use by a job; the request may be retried when it finishes."""


def installed_models() -> dict[str, bool]:
    """Registered model names and whether their weight packages are installed (located, never imported)."""
    out = {}
    for name, source in REGISTRY.items():
        try:
            gguf_parts(source)
            out[name] = True
        except FactEditError:
            out[name] = False
    return out


def fill_prompt(prompt: str, subject: str | None) -> tuple[str, str | None]:
    """``(text, template)``: the full prompt, and the ``{}`` template when a subject is known.

    The page lets users type either "The Eiffel Tower is in" with subject "Eiffel Tower"
    or "The {} is in"; the core wants a template for edits and traces.
    """
    if subject is None:
        if "{}" in prompt:
            raise FactEditError("the prompt has a {} placeholder: give the subject that goes there")
        return prompt, None
    if prompt.count("{}") > 1:
        raise FactEditError("the prompt must contain at most one {} placeholder")
    template = as_template(prompt, subject)
    return template.replace("{}", subject, 1), template


class ModelSession:
    """The loaded model, its tokenizer, its patch stack (with the page's listing) and its edit resources.

    ``resources``: one :class:`EditResources` per loaded model (statistics and templates of the unedited
    weights, reused by every edit; ``second_moment`` seeds it for the first model).
    ``generation`` counts loaded models: jobs queued for one model refuse to run on the next.
    ``check_tok``: a private copy of the tokenizer for request-time checks (HF fast tokenizers
    must not be used from two threads at once), replaced with the model; use under ``check_lock``.
    ``hparams_overrides``: server-side settings (e.g. ``mom2_n_tokens``) applied, where a method's
    class has them, before the client's own overrides.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        name: str = DEFAULT_MODEL,
        *,
        second_moment: dict[int, torch.Tensor] | None = None,
        hparams_overrides: dict[str, Any] | None = None,
        busy_timeout: float = 5.0,
        loader: Callable[[str], tuple[nn.Module, PreTrainedTokenizerBase]] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.check_lock = threading.Lock()
        self.generation = 0
        self.busy_timeout = busy_timeout
        self.hparams_overrides = dict(hparams_overrides or {})
        self._loader = loader
        self._set_model(model, tokenizer, name, second_moment)

    def _set_model(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        second_moment: dict[int, torch.Tensor] | None = None,
    ) -> None:
        arch_for(model)  # refuse unsupported families early
        check_tok = copy.deepcopy(tokenizer)
        resources = EditResources(model, tokenizer, second_moment=second_moment)
        with self.check_lock:
            self.model, self.tok, self.name = model, tokenizer, name
            self.check_tok = check_tok
            self.resources = resources
            self.stack = PatchStack(model)
            self.listed: list[PatchListing] = []  # the stack's pushes, same order, with the page's ids
            self._noise: float | None = None
            self.base_fingerprint = resources.base_fingerprint
            self.fingerprint = self.base_fingerprint
            self.identity = model_identity(model)
            self.generation += 1

    @property
    def patches(self) -> list[PatchListing]:
        """The applied patches as the page lists them, oldest first."""
        return list(self.listed)

    def check_generation(self, generation: int | None, what: str) -> None:
        """Refuse a job queued for a model that has been replaced since (call under ``lock``)."""
        if generation is not None and generation != self.generation:
            raise Conflict(
                f"the model was switched (now {self.name!r}) after this {what} was queued for the "
                "previous one; submit it again"
            )

    # -- access -------------------------------------------------------------------------
    @contextlib.contextmanager
    def using_model(self, wait: float | None = None) -> Iterator[None]:
        """Hold the model lock; raise :class:`Busy` if a job keeps it longer than ``wait`` seconds."""
        if not self.lock.acquire(timeout=self.busy_timeout if wait is None else wait):
            raise Busy("the model is busy with a running job; try again when it has finished")
        try:
            yield
        finally:
            self.lock.release()

    def info(self) -> dict[str, Any]:
        model = self.model
        return {
            "model": self.name,
            "default_model": DEFAULT_MODEL,
            "family": arch_for(model).family,
            "model_type": getattr(model.config, "model_type", None),
            "num_layers": num_layers(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "fingerprint": self.fingerprint,
            "base_fingerprint": self.base_fingerprint,
            "edited": bool(self.listed),
            "methods": edit_method_names(),
            "method_details": method_catalogue(),
            "edit_defaults": edit_defaults(model, self.hparams_overrides),
        }

    def hparams_for(self, method: str, overrides: dict[str, Any] | None) -> HyperParams:
        """The method's defaults, the server's settings, then the client's (see :func:`resolve_hparams`)."""
        return resolve_hparams(self.model, method, self.hparams_overrides, overrides)

    # -- predictions ---------------------------------------------------------------------
    def predict(self, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        from factedit.predict import top_next_tokens

        with self.using_model():
            return top_next_tokens(self.model, self.tok, texts, k)

    # -- tracing -------------------------------------------------------------------------
    def trace(
        self,
        prompt: str,
        subject: str,
        answer: str | None,
        samples: int,
        window: int,
        report: Reporter,
        generation: int | None = None,
    ) -> dict[str, Any]:
        """Causal trace (fast method) of hidden / MLP / attention states; the score matrices as JSON.

        ``prompt``: the template with ``{}`` where ``subject`` goes (or a full prompt containing it).
        """
        from factedit.tracing.core import DEFAULT_NOISE_FACTOR, KINDS, causal_trace
        from factedit.tracing.noise import noise_scale

        with self.using_model(wait=3600):
            self.check_generation(generation, "trace")
            report(0.0, "noise scale")
            if self._noise is None:  # the embeddings are never edited, so one value per loaded model
                self._noise = DEFAULT_NOISE_FACTOR * noise_scale(self.model, self.tok)
            report(0.02, "tracing")
            result = causal_trace(
                self.model,
                self.tok,
                prompt,
                subject,
                answer,
                kinds=KINDS,
                samples=samples,
                window=window,
                noise=self._noise,
                method="fast",
                progress=JobProgress(report.span(0.02, 1.0), share=1.0),
            )
        out = result.to_dict()
        out["meta"]["model"] = self.name
        out["meta"]["fingerprint"] = self.fingerprint
        out["effects_peak"] = {
            k: dict(zip(("token", "layer", "score"), result.peak(k), strict=True)) for k in result.kinds
        }
        return out

    # -- editing -------------------------------------------------------------------------
    def edit(
        self,
        request: EditRequest,
        method: str,
        hp: HyperParams,
        paraphrases: list[str],
        neighbours: list[str],
        generate_tokens: int,
        report: Reporter,
        generation: int | None = None,
    ) -> dict[str, Any]:
        """Compute one edit and push it on the stack; predictions and a generation before and after."""
        from factedit.editing.report import edit_and_compare

        with self.using_model(wait=3600):
            # hp was resolved against the model loaded when the request came: refuse if it was switched since
            self.check_generation(generation, "edit")
            report(0.0, "predictions before the edit")
            pushed = len(self.stack)
            try:
                result = edit_and_compare(
                    self.model,
                    self.tok,
                    request,
                    method,
                    hp,
                    resources=self.resources,
                    paraphrases=paraphrases,
                    neighbours=neighbours,
                    generate_tokens=generate_tokens,
                    stack=self.stack,
                    progress=JobProgress(report.span(0.02, 0.97)),
                )
            except BaseException:
                while len(self.stack) > pushed:  # a failure after the push: the model goes back as it was
                    self.stack.pop()
                raise
            finally:
                self.fingerprint = model_fingerprint(self.model)  # stay truthful whatever happened
            listing = None
            for handle in result.applied:  # one for a single edit
                listing = PatchListing(id=new_patch_id(), patch=handle.patch, source="edit", handle=handle)
                self.listed.append(listing)
            report(0.98, "done: " + result.summary_line())
        return report_json(result, listing.summary() if listing is not None else None)

    # -- patches -------------------------------------------------------------------------
    def find_patch(self, patch_id: str) -> PatchListing | None:
        return next((p for p in self.listed if p.id == patch_id), None)

    def check_revertible(self, patch_id: str) -> PatchListing:
        """The listing of ``patch_id`` if it is the newest push (``KeyError`` if unknown, else :class:`Conflict`)."""
        entry = self.find_patch(patch_id)
        if entry is None:
            raise KeyError(patch_id)
        if self.listed[-1] is not entry:
            raise Conflict(
                f"patch {patch_id} is not the last applied one: revert {self.listed[-1].id} first "
                "(patches are reverted in the reverse order of application)"
            )
        return entry

    def revert(self, patch_id: str, report: Reporter) -> dict[str, Any]:
        with self.using_model(wait=3600):
            try:
                entry = self.check_revertible(patch_id)
            except KeyError:
                raise FactEditError(f"patch {patch_id} is no longer applied") from None
            report(0.1, "restoring the original weights")
            try:
                self.stack.pop()  # bit-exact; the stack refuses (changing nothing) if that is not safe
            finally:
                self.fingerprint = model_fingerprint(self.model)
            self.listed.pop()
        return {
            "reverted": entry.summary(),
            "fingerprint": self.fingerprint,
            "restored_base": self.fingerprint == self.base_fingerprint,
        }

    def revert_all(self) -> None:
        """Restore the loaded model's weights as they were before the first push (call under ``lock``)."""
        try:
            self.stack.revert_all()
        finally:
            self.fingerprint = model_fingerprint(self.model)
        self.listed.clear()

    def validate_upload(self, data: bytes) -> Patch:
        """Parse and check a patch file against the current model without touching its weights."""
        patch = parse_upload(data)
        self.check_upload(patch)
        return patch

    def check_upload(self, patch: Patch) -> None:
        """The checks of :meth:`validate_upload` after parsing (again under ``lock`` before applying)."""
        check_upload(
            patch,
            self.model,
            name=self.name,
            identity=self.identity,
            fingerprint=self.fingerprint,
            base_fingerprint=self.base_fingerprint,
            edited=bool(self.listed),
        )

    def apply_uploaded(self, patch: Patch, report: Reporter, generation: int | None = None) -> dict[str, Any]:
        with self.using_model(wait=3600):
            self.check_generation(generation, "upload")
            self.check_upload(patch)  # the model may have changed since the upload was validated
            listing = PatchListing(id=new_patch_id(), patch=patch, source="upload")  # summary before applying
            report(0.1, "applying the patch")
            try:
                listing.handle = self.stack.push(patch)  # the core checks identity, shapes and fingerprint again
            finally:
                self.fingerprint = model_fingerprint(self.model)
            self.listed.append(listing)
        return {"patch": listing.summary(), "fingerprint": self.fingerprint}

    # -- switching models ----------------------------------------------------------------
    def switch(self, name: str, report: Reporter) -> dict[str, Any]:
        """Load another registered model in place of this one (only with no patch applied)."""
        with self.using_model(wait=3600):
            if self.listed:
                raise Conflict("revert the applied patches before switching models")
            if name == self.name:
                return {"model": name, "changed": False}
            report(0.05, f"loading {name}")
            if self._loader is not None:
                model, tok = self._loader(name)
            else:
                from factedit.models import load_model

                device = next(self.model.parameters()).device
                model, tok = load_model(name, device=device, dtype=next(self.model.parameters()).dtype)
            self._set_model(model, tok, name)
        return {"model": name, "changed": True}
