"""The web app's state: one loaded model, its patch stack and shared edit resources, and the jobs' work on it.

The HTTP layer (``app.py``) validates requests and queues these methods as jobs; the work itself is
the library's: :func:`~factedit.editing.report.edit_and_compare` edits and compares,
:class:`~factedit.editing.patch.PatchStack` applies and reverts (newest first, bit-exact),
:class:`~factedit.editing.resources.EditResources` keeps statistics and templates. Model access is
serialised by ``lock``: the job worker holds it for a whole job; predictions take it batch by batch
from their own thread (:mod:`factedit.web.predictions`) and answer "busy" only when a job keeps it
longer than the busy timeout. The stack is capped (number of patches, bytes of replaced weights it
keeps) and, when a :class:`~factedit.web.persist.PatchStore` folder is attached, saved on disk after
every change and re-applied, verified, when the server starts again.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams
from factedit.editing.patch import Patch, PatchStack
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, get_parameter, num_layers
from factedit.models.fingerprint import model_fingerprint, model_identity
from factedit.models.registry import DEFAULT_MODEL, REGISTRY, gguf_parts
from factedit.text import as_template
from factedit.web.edits import edit_defaults, edit_method_names, method_catalogue, report_json, resolve_hparams
from factedit.web.jobs import JobProgress, Reporter
from factedit.web.limits import WebLimits
from factedit.web.patches import Conflict, PatchListing, check_upload, new_patch_id, parse_upload
from factedit.web.persist import PatchStore, StoreInUse, model_folder

log = logging.getLogger(__name__)

__all__ = ["Busy", "Conflict", "ModelSession", "fill_prompt", "installed_models"]


class Busy(Exception):
    """The model is in use by a job; the request may be retried when it finishes."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


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
        limits: WebLimits | None = None,
        store_root: Path | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.check_lock = threading.Lock()
        self.generation = 0
        self.busy_timeout = busy_timeout
        self.limits = limits or WebLimits()
        self.hparams_overrides = dict(hparams_overrides or {})
        self._loader = loader
        self._jobs_waiting = 0  # jobs blocked on the model lock: predictions step aside for them
        self.holder: str | None = None  # what holds the model lock, for honest "busy" answers
        self.store_root = store_root
        self.store: PatchStore | None = None
        self.persistence: dict[str, Any] = {"enabled": False, "folder": None, "restored": 0, "problem": None}
        self._set_model(model, tokenizer, name, second_moment)
        self._attach_store()

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
            self._static_info = {  # what /api/info shows that only changes with the model: computed once
                "model": name,
                "default_model": DEFAULT_MODEL,
                "family": arch_for(model).family,
                "model_type": getattr(model.config, "model_type", None),
                "num_layers": num_layers(model),
                "parameters": sum(p.numel() for p in model.parameters()),
                "methods": edit_method_names(),
                "method_details": method_catalogue(),
                "edit_defaults": edit_defaults(model, self.hparams_overrides),
            }

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
    def using_model(self, wait: float | None = None, what: str | None = None) -> Iterator[None]:
        """Hold the model lock; raise :class:`Busy` if a job keeps it longer than ``wait`` seconds.

        ``what`` (a job kind) marks a job: predictions let a waiting job go first, and name it when busy.
        """
        if what is not None:
            with self.check_lock:
                self._jobs_waiting += 1
        try:
            if not self.lock.acquire(timeout=self.busy_timeout if wait is None else wait):
                raise Busy(self.busy_message())
        finally:
            if what is not None:
                with self.check_lock:
                    self._jobs_waiting -= 1
        self.holder = what
        try:
            yield
        finally:
            self.holder = None
            self.lock.release()

    def busy_message(self) -> str:
        holder = self.holder
        job = f"a running {holder} job" if holder else "a running job"
        return f"the model is busy with {job}; try again when it has finished"

    def acquire_for_prediction(self) -> None:
        """Take the model for one batch of predictions (after any job already waiting for it)."""
        deadline = time.monotonic() + self.busy_timeout
        while self._jobs_waiting and time.monotonic() < deadline:
            time.sleep(0.005)  # a job asked first: predictions must not starve it
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Busy(self.busy_message())

    def release_after_prediction(self) -> None:
        self.lock.release()

    def info(self) -> dict[str, Any]:
        """What /api/info shows: no model access and no lock, so it answers while a job runs."""
        listed = self.patches
        return {
            **self._static_info,
            "fingerprint": self.fingerprint,
            "base_fingerprint": self.base_fingerprint,
            "edited": bool(listed),
            "patches": len(listed),
            "patch_memory": sum(p.bytes_held for p in listed),
            "persistence": dict(self.persistence),
        }

    def wrap(self, text: str, chat: bool) -> str:
        """``text`` (a prompt or a ``{}`` template) in the loaded model's chat template when ``chat``."""
        if not chat:
            return text
        from factedit.models.chat import chat_format

        with self.check_lock:
            return chat_format(self.check_tok, f"model {self.name}").wrap(text)

    def hparams_for(self, method: str, overrides: dict[str, Any] | None) -> HyperParams:
        """The method's defaults, the server's settings, then the client's (see :func:`resolve_hparams`)."""
        return resolve_hparams(self.model, method, self.hparams_overrides, overrides)

    # -- predictions ---------------------------------------------------------------------
    def predict(self, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k predictions, taking the model lock (scripts; the app goes through its predictor)."""
        with self.using_model():
            return self.predict_locked(texts, k)

    def predict_locked(self, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k predictions; the caller holds the model lock."""
        from factedit.predict import top_next_tokens

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

        with self.using_model(wait=3600, what="trace"):
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

    # -- stack caps ---------------------------------------------------------------------
    def weight_bytes(self, names: list[str]) -> int:
        """Bytes of the named weights: what a push keeps of them to revert bit-exact."""
        total = 0
        for name in dict.fromkeys(names):
            try:
                param = get_parameter(self.model, name)
            except (AttributeError, KeyError, FactEditError):
                continue
            total += param.numel() * param.element_size()
        return total

    def held_bytes(self) -> int:
        return sum(p.bytes_held for p in self.listed)

    def check_room(self, new_bytes: int, what: str) -> None:
        """Refuse (409) a push that would exceed the patch-count or the replaced-weights cap."""
        limits = self.limits
        if len(self.listed) >= limits.max_patches:
            raise Conflict(
                f"{len(self.listed)} patches are applied, the most this server keeps (factedit serve "
                f"--max-patches); revert one before this {what}"
            )
        held = self.held_bytes()
        if held + new_bytes > limits.max_patch_memory:
            raise Conflict(
                f"this {what} would keep {_mib(new_bytes)} of replaced weights on top of the {_mib(held)} the "
                f"applied patches keep, above this server's {_mib(limits.max_patch_memory)} (factedit serve "
                "--max-patch-memory); revert a patch first"
            )

    def edit_bytes(self, hp: HyperParams) -> int:
        """What an edit with ``hp`` will keep: the rewritten weight of each of its layers (every method's)."""
        arch = arch_for(self.model)
        return self.weight_bytes([arch.rewrite_weight_at(layer) for layer in getattr(hp, "layers", [])])

    # -- persistence ----------------------------------------------------------------------
    def _attach_store(self) -> None:
        """Open this model's saved stack (if a store root is set) and re-apply it, verified."""
        if self.store_root is None:
            self.persistence = {"enabled": False, "folder": None, "restored": 0, "problem": None}
            return
        folder = model_folder(self.store_root, self.name)
        self.persistence = {"enabled": False, "folder": str(folder), "restored": 0, "problem": None}
        try:
            self.store = PatchStore(folder)
        except (StoreInUse, OSError) as exc:
            self.persistence["problem"] = f"{exc}; applied patches are kept in memory only"
            log.warning("web patch stack not saved: %s", self.persistence["problem"])
            return
        self.persistence["enabled"] = True
        try:
            self._restore()
        except OSError as exc:  # e.g. a folder that became read-only: keep serving, say so
            self.persistence.update(enabled=False, problem=f"cannot write {folder}: {exc}; patches kept in memory only")
            self._detach_store()

    def _detach_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def _restore(self) -> None:
        store = self.store
        assert store is not None
        entries = store.entries()
        problem = None
        if entries and store.base_fingerprint != self.base_fingerprint:
            problem = (
                f"the {len(entries)} saved patch(es) were applied to other weights "
                f"({str(store.base_fingerprint)[:12]}, the model is {self.base_fingerprint[:12]})"
            )
        restored = 0
        if problem is None:
            for entry in entries:
                try:
                    self._restore_one(entry)
                except (FactEditError, ValueError, OSError) as exc:
                    problem = f"saved patch {restored + 1} of {len(entries)} ({entry['file']}) was refused: {exc}"
                    break
                restored += 1
        if problem is not None:
            moved = store.keep_first(restored, problem)
            problem += f"; it and the later ones were moved to {moved}" if moved else ""
            log.warning("web patch stack: %s", problem)
        store.settle(self.base_fingerprint)
        self.fingerprint = model_fingerprint(self.model)
        self.persistence.update(restored=restored, saved=len(entries), problem=problem)
        if restored:
            log.info("restored %d applied patch(es) from %s", restored, store.folder)

    def _restore_one(self, entry: dict[str, Any]) -> None:
        store = self.store
        assert store is not None
        patch = parse_upload(store.read(entry))
        self.check_upload(patch)
        self.check_room(self.weight_bytes(list(patch.weight_names)), "restored patch")
        listing = PatchListing(
            id=entry["id"], patch=patch, source=entry["source"], created=float(entry.get("created") or time.time())
        )
        listing.bytes_held = self.weight_bytes(list(patch.weight_names))
        listing.handle = self.stack.push(patch)
        fingerprint = model_fingerprint(self.model)
        if fingerprint != entry["fingerprint"]:
            self.stack.pop()
            raise ValueError(
                f"after applying it the weights are {fingerprint[:12]}, not the {entry['fingerprint'][:12]} recorded"
            )
        self.fingerprint = fingerprint
        self.listed.append(listing)

    def _save(self, listing: PatchListing) -> None:
        """Save a new push (called under ``lock``, before the job reports done); a failure is the job's."""
        if self.store is None:
            return
        try:
            self.store.add(listing.id, listing.source, listing.created, listing.patch.to_bytes(), self.fingerprint)
        except OSError as exc:
            raise FactEditError(
                f"could not save the patch in {self.store.folder} ({exc}); it was not applied "
                "(factedit serve --no-persist keeps patches in memory only)"
            ) from exc

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
        """Compute one edit and push it on the stack; predictions and a generation before and after.

        A cancelled or failed edit is never left applied: the push is popped on any exception up to
        the commit point (the stack caps are checked again after the push, on the real patch).
        """
        from factedit.editing.report import edit_and_compare

        with self.using_model(wait=3600, what="edit"):
            # hp was resolved against the model loaded when the request came: refuse if it was switched since
            self.check_generation(generation, "edit")
            self.check_room(self.edit_bytes(hp), "edit")
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
                listings = []
                for handle in result.applied:  # one for a single edit
                    listing = PatchListing(id=new_patch_id(), patch=handle.patch, source="edit", handle=handle)
                    listing.bytes_held = self.weight_bytes(list(handle.patch.weight_names))
                    listings.append(listing)
                report(0.97, "saving the edit", check=False)
                report.commit()  # from here on the edit is kept: no cancel
                self.fingerprint = model_fingerprint(self.model)
                for listing in listings:
                    self._save(listing)
            except BaseException:
                while len(self.stack) > pushed:  # cancelled, failed or not saved: the model goes back as it was
                    self.stack.pop()
                raise
            finally:
                self.fingerprint = model_fingerprint(self.model)  # stay truthful whatever happened
            self.listed.extend(listings)
            report(0.98, "done: " + result.summary_line(), check=False)
        return report_json(result, listings[-1].summary() if listings else None)

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
        with self.using_model(wait=3600, what="revert"):
            try:
                entry = self.check_revertible(patch_id)
            except KeyError:
                raise FactEditError(f"patch {patch_id} is no longer applied") from None
            report.commit()
            report(0.1, "restoring the original weights", check=False)
            try:
                self.stack.pop()  # bit-exact; the stack refuses (changing nothing) if that is not safe
            finally:
                self.fingerprint = model_fingerprint(self.model)
            self.listed.pop()
            self._forget_saved(entry.id)
        return {
            "reverted": entry.summary(),
            "fingerprint": self.fingerprint,
            "restored_base": self.fingerprint == self.base_fingerprint,
        }

    def _forget_saved(self, patch_id: str) -> None:
        if self.store is None:
            return
        try:
            self.store.remove_last(patch_id)
        except OSError as exc:  # the weights are reverted; a stale file would be refused on restore
            log.warning("could not update the saved stack in %s: %s", self.store.folder, exc)
            self.persistence["problem"] = f"could not update the saved stack ({exc})"

    def revert_all(self) -> None:
        """Restore the loaded model's weights as they were before the first push (call under ``lock``)."""
        try:
            self.stack.revert_all()
        finally:
            self.fingerprint = model_fingerprint(self.model)
        for entry in reversed(self.listed):
            self._forget_saved(entry.id)
        self.listed.clear()

    def validate_upload(self, data: bytes) -> Patch:
        """Parse and check a patch file against the current model without touching its weights."""
        patch = parse_upload(data)
        self.check_upload(patch)
        self.check_room(self.weight_bytes(list(patch.weight_names)), "upload")
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
        with self.using_model(wait=3600, what="upload"):
            self.check_generation(generation, "upload")
            self.check_upload(patch)  # the model may have changed since the upload was validated
            held = self.weight_bytes(list(patch.weight_names))
            self.check_room(held, "upload")
            listing = PatchListing(id=new_patch_id(), patch=patch, source="upload")  # summary before applying
            listing.bytes_held = held
            report.commit()
            report(0.1, "applying the patch", check=False)
            pushed = len(self.stack)
            try:
                listing.handle = self.stack.push(patch)  # the core checks identity, shapes and fingerprint again
                self.fingerprint = model_fingerprint(self.model)
                self._save(listing)
            except BaseException:
                while len(self.stack) > pushed:
                    self.stack.pop()
                raise
            finally:
                self.fingerprint = model_fingerprint(self.model)
            self.listed.append(listing)
        return {"patch": listing.summary(), "fingerprint": self.fingerprint}

    # -- switching models ----------------------------------------------------------------
    def switch(self, name: str, report: Reporter) -> dict[str, Any]:
        """Load another registered model in place of this one (only with no patch applied); its saved
        patches, if any, are restored as at start."""
        with self.using_model(wait=3600, what="load"):
            if self.listed:
                raise Conflict("revert the applied patches before switching models")
            if name == self.name:
                return {"model": name, "changed": False}
            report.commit()
            report(0.05, f"loading {name}", check=False)
            if self._loader is not None:
                model, tok = self._loader(name)
            else:
                from factedit.models import load_model
                from factedit.models.placement import device_map_of, input_device

                # a placed model's map names its own modules: the next model is placed by accelerate ("auto")
                placed = device_map_of(self.model)
                dtype = next(self.model.parameters()).dtype
                if placed is not None:
                    model, tok = load_model(name, device="cpu", dtype=dtype, device_map="auto")
                else:
                    model, tok = load_model(name, device=input_device(self.model), dtype=dtype)
            self._detach_store()
            self._set_model(model, tok, name)
            self._attach_store()
        return {"model": name, "changed": True, "restored": self.persistence.get("restored", 0)}

    def close(self) -> None:
        """Release the saved stack's folder (the patches stay saved)."""
        self._detach_store()
