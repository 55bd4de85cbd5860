"""The web app's state: one loaded model, the patches applied to it, and the work done on it.

All model work goes through :class:`ModelSession`; the HTTP layer (``app.py``) only
validates requests and queues these methods as jobs. Model access is serialised by
``lock``: the job worker holds it for a whole job, quick synchronous reads (top-k
predictions) wait for it a few seconds at most and otherwise answer "busy".

Applied patches form a stack: only the most recently applied one can be reverted
(LIFO). Each :class:`~factedit.editing.patch.Patch` keeps the weights it replaced, so
reverting the top of the stack restores them bit-exact; reverting one from the middle
would restore weights that later patches were computed on, so it is refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from factedit.editing.patch import Patch
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, get_module, num_layers
from factedit.models.fingerprint import model_fingerprint, model_identity
from factedit.models.registry import DEFAULT_MODEL, REGISTRY, gguf_parts
from factedit.web.jobs import Progress

log = logging.getLogger(__name__)

# Hyper-parameters a client may override (numbers and layer lists only: nothing that names a file).
EDITABLE_HPARAMS = ("layers", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor")
METHODS = ("rome", "rome-original", "memit")


class Busy(Exception):
    """The model is in use by a job; the request may be retried when it finishes."""


class Conflict(FactEditError):
    """The request is valid but not in the current state (e.g. reverting a patch that is not the last)."""


def _text(value: Any, limit: int = 300) -> str | None:
    """A string from a patch's metadata, cut to ``limit`` characters; anything else is ``None``."""
    return value[:limit] if isinstance(value, str) else None


def _ints(value: Any, limit: int = 64) -> list[int] | None:
    if not isinstance(value, list):
        return None
    return [x for x in value[:limit] if isinstance(x, int) and not isinstance(x, bool)]


def summarize_patch(patch: Patch) -> dict[str, Any]:
    """What the page lists about a patch, built only from well-typed metadata (never raises).

    Uploaded patches are validated by :meth:`ModelSession.validate_upload` first; this is the
    second line of defence, so that a listing can never fail on a strange value.
    """
    try:
        requests = patch.requests if isinstance(patch.requests, list) else []
        req = requests[0] if requests and isinstance(requests[0], dict) else {}
        prompt, subject = _text(req.get("prompt"), 1000), _text(req.get("subject"))
        text = prompt.replace("{}", subject, 1) if prompt is not None and subject is not None else None
        hparams = patch.hparams if isinstance(patch.hparams, dict) else {}
        entries = patch.entries if isinstance(patch.entries, list) else []
        return {
            "method": _text(patch.method, 40),
            "request": {"text": text, "subject": subject, "target_new": _text(req.get("target_new")),
                        "target_true": _text(req.get("target_true"))},
            "n_requests": len(requests),
            "weights": [name for name in (_text(getattr(e, "name", None)) for e in entries[:256]) if name is not None],
            "layers": _ints(hparams.get("layers")),
        }
    except Exception:  # noqa: BLE001 - a summary must never break a listing
        log.exception("could not summarise a patch")
        return {"method": None, "request": {"text": None, "subject": None, "target_new": None, "target_true": None},
                "n_requests": 0, "weights": [], "layers": None}


@dataclass
class AppliedPatch:
    """A patch applied through the app (by an edit or an upload), with what the page lists about it.

    The summary is built once, when the entry is created (before the patch is applied), so
    listing patches never depends on the patch's metadata again.
    """

    id: str
    patch: Patch
    source: str  # "edit" or "upload"
    created: float = field(default_factory=time.time)
    _summary: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._summary = summarize_patch(self.patch)

    def summary(self) -> dict[str, Any]:
        out = copy.deepcopy(self._summary)
        out.update({"id": self.id, "source": self.source, "created": self.created})
        return out


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
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise FactEditError("the prompt must contain at most one {} placeholder")
        return prompt.replace("{}", subject, 1), prompt
    if subject not in prompt:
        raise FactEditError(f"subject {subject!r} does not occur in the prompt {prompt!r} (matching is case-sensitive)")
    return prompt, prompt.replace(subject, "{}", 1)


@contextlib.contextmanager
def _bars_to(progress: Progress, modules: list[Any]) -> Iterator[None]:
    """Route the core's tqdm progress bars into a job's progress while it runs.

    The core reports long loops (statistics tokens, trace restorations) through
    ``tqdm`` imported at module level; swapping that name for a silent bar that
    forwards ``update`` lets the page show real progress without changing the core.
    Safe because only the single job worker runs such code.
    """

    class Bar:
        def __init__(self, iterable: Any = None, total: float | None = None, desc: str | None = None, **_: Any):
            self.iterable = iterable
            self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
            self.desc = desc or "working"
            self.n = 0

        def update(self, n: float = 1) -> None:
            self.n += n
            if self.total:
                progress(self.n / self.total, f"{self.desc}: {int(self.n):,} / {int(self.total):,}")

        def __iter__(self) -> Iterator[Any]:
            for item in self.iterable:
                yield item
                self.update(1)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.close()

        def close(self) -> None:
            pass

        def set_postfix(self, *a: Any, **k: Any) -> None:
            pass

        def set_description(self, *a: Any, **k: Any) -> None:
            pass

    saved = [(m, m.tqdm) for m in modules]
    for m, _ in saved:
        m.tqdm = Bar
    try:
        yield
    finally:
        for m, original in saved:
            m.tqdm = original


@contextlib.contextmanager
def _count_calls(module: nn.Module, expected: int, progress: Progress, message: str) -> Iterator[None]:
    """Report progress of a loop the core does not instrument (the v*/z optimisation) by counting forwards."""
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1
        progress(min(calls / max(expected, 1), 0.99), message)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class ModelSession:
    """The loaded model, its tokenizer, the applied-patch stack and the per-model caches.

    ``second_moment``: ``{layer: C}`` computed on the unedited model, reused by every edit
    (as :class:`~factedit.editing.sequential.SequentialEditor` does), so a second edit on an
    edited model does not recompute statistics under a new fingerprint.

    Statistics and context templates are kept in memory keyed by the fingerprint of the
    weights they were computed on. Those of the unedited model are preferred; when an edit
    needs one that the unedited model has not given yet while patches are applied (e.g. the
    first edit comes after an upload), it is computed on the current weights and kept under
    their fingerprint (the core's disk caches are keyed the same way), never filed as the
    unedited model's.
    ``generation`` counts loaded models: jobs queued for one model refuse to run on the next.
    ``check_tok``: a private copy of the tokenizer for request-time checks (HF fast tokenizers
    must not be used from two threads at once), replaced with the model; use under ``check_lock``.
    ``hparams_overrides``: server-side defaults (e.g. ``mom2_n_tokens``) applied before the
    client's own overrides.
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
        self._set_model(model, tokenizer, name)
        if second_moment:
            self._moments[self.base_fingerprint] = dict(second_moment)

    def _set_model(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        arch_for(model)  # refuse unsupported families early
        check_tok = copy.deepcopy(tokenizer)
        with self.check_lock:
            self.model, self.tok, self.name = model, tokenizer, name
            self.check_tok = check_tok
            self.patches: list[AppliedPatch] = []
            self._moments: dict[str, dict[int, torch.Tensor]] = {}  # {weights fingerprint: {layer: C}}
            self._templates: dict[tuple[str, str], list[str]] = {}  # {(weights fingerprint, settings): templates}
            self._noise: float | None = None
            self.base_fingerprint = model_fingerprint(model)
            self.fingerprint = self.base_fingerprint
            self.identity = model_identity(model)
            self.generation += 1

    def check_generation(self, generation: int | None, what: str) -> None:
        """Refuse a job queued for a model that has been replaced since (call under ``lock``)."""
        if generation is not None and generation != self.generation:
            raise Conflict(f"the model was switched (now {self.name!r}) after this {what} was queued for the "
                           "previous one; submit it again")

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
        arch = arch_for(model)
        n_params = sum(p.numel() for p in model.parameters())
        return {
            "model": self.name, "default_model": DEFAULT_MODEL, "family": arch.family,
            "model_type": getattr(model.config, "model_type", None), "num_layers": num_layers(model),
            "parameters": n_params, "fingerprint": self.fingerprint, "base_fingerprint": self.base_fingerprint,
            "edited": bool(self.patches), "methods": list(METHODS), "edit_defaults": self.edit_defaults(),
        }

    def edit_defaults(self) -> dict[str, dict[str, Any]]:
        """The family's default values of the client-editable hyper-parameters, per method."""
        out = {}
        for method in METHODS:
            try:
                hp = self._base_hparams(method)
            except FactEditError:
                continue
            out[method] = {k: getattr(hp, k) for k in EDITABLE_HPARAMS}
        return out

    def _base_hparams(self, method: str) -> ROMEHyperParams | MEMITHyperParams:
        cls = MEMITHyperParams if method == "memit" else ROMEHyperParams
        base = {k: v for k, v in self.hparams_overrides.items() if k in cls.model_fields}
        hp = cls.for_model(self.model, **base)
        if method != "memit":
            hp = hp.replace(consistent_key=method == "rome")
        return hp

    def hparams_for(self, method: str, overrides: dict[str, Any] | None) -> ROMEHyperParams | MEMITHyperParams:
        """Family defaults, server overrides, then the client's (validated by the core's pydantic model)."""
        if method not in METHODS:
            raise FactEditError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        hp = self._base_hparams(method)
        changes = {k: v for k, v in (overrides or {}).items() if v is not None}
        bad = sorted(set(changes) - set(EDITABLE_HPARAMS))
        if bad:
            raise FactEditError(f"hyper-parameter(s) {bad} cannot be set here; allowed: {', '.join(EDITABLE_HPARAMS)}")
        if changes:
            hp = hp.replace(**changes)
        hp.check_model(self.model)
        return hp

    # -- predictions ---------------------------------------------------------------------
    def predict(self, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        from factedit.predict import top_next_tokens

        with self.using_model():
            return top_next_tokens(self.model, self.tok, texts, k)

    # -- tracing -------------------------------------------------------------------------
    def trace(self, prompt: str, subject: str, answer: str | None, samples: int, window: int,
              progress: Progress, generation: int | None = None) -> dict[str, Any]:
        """Causal trace (fast method) of hidden / MLP / attention states; the score matrices as JSON.

        ``prompt``: the template with ``{}`` where ``subject`` goes (or a full prompt containing it).
        """
        import factedit.tracing.core as core
        from factedit.tracing.noise import noise_scale

        with self.using_model(wait=3600):
            self.check_generation(generation, "trace")
            progress(0.0, "noise scale")
            if self._noise is None:  # the embeddings are never edited, so one value per loaded model
                self._noise = core.DEFAULT_NOISE_FACTOR * noise_scale(self.model, self.tok)
            progress(0.02, "tracing")
            with _bars_to(progress.span(0.02, 1.0), [core]):
                result = core.causal_trace(self.model, self.tok, prompt, subject, answer, kinds=core.KINDS,
                                           samples=samples, window=window, noise=self._noise, method="fast",
                                           progress=True)
        out = result.to_dict()
        out["meta"]["model"] = self.name
        out["meta"]["fingerprint"] = self.fingerprint
        out["effects_peak"] = {k: dict(zip(("token", "layer", "score"), result.peak(k))) for k in result.kinds}
        return out

    # -- editing -------------------------------------------------------------------------
    def edit(self, request: EditRequest, method: str, hp: ROMEHyperParams | MEMITHyperParams,
             paraphrases: list[str], neighbours: list[str], generate_tokens: int,
             progress: Progress, generation: int | None = None) -> dict[str, Any]:
        """Compute and apply one edit; predictions and a generation before and after."""
        import factedit.stats.second_moment as sm
        from factedit.editing.memit import compute_memit
        from factedit.editing.rome import compute_rome
        from factedit.editing.templates import context_templates
        from factedit.predict import generate, probe, top_next_tokens

        with self.using_model(wait=3600):
            # hp was resolved against the model loaded when the request came: refuse if it was switched since
            self.check_generation(generation, "edit")
            model, tok = self.model, self.tok
            started = time.perf_counter()
            hp.check_model(model)
            progress(0.0, "predictions before the edit")
            if request.target_true is None:
                top = top_next_tokens(model, tok, [request.text], 1)[0][0][0]
                request = EditRequest(prompt=request.prompt, subject=request.subject, target_new=request.target_new,
                                      target_true=top.strip() or top)
            checks = ([("prompt", request.text)] + [("paraphrase", p) for p in paraphrases]
                      + [("neighbour", p) for p in neighbours])
            before = probe(model, tok, checks, request.new_text, request.true_text)
            gen_before = generate(model, tok, request.text, max_new_tokens=generate_tokens) if generate_tokens else None

            # statistics and templates of the unedited weights when known, else of the current ones
            base_moments = self._moments.get(self.base_fingerprint, {})
            stats_fp = (self.base_fingerprint if all(layer in base_moments for layer in hp.layers)
                        else self.fingerprint)
            store = self._moments.setdefault(stats_fp, {})
            missing = [layer for layer in hp.layers if layer not in store]
            if missing and getattr(hp, "mom2_adjustment", True):  # MEMIT always uses C
                progress(0.05, f"second-moment statistics for layer(s) {missing} (first edit only)")
                with _bars_to(progress.span(0.05, 0.6), [sm]):
                    store.update(sm.second_moments(
                        model, tok, missing, corpus=hp.mom2_dataset, n_tokens=hp.mom2_n_tokens,
                        max_length=hp.mom2_max_length, dtype=hp.mom2_dtype, progress=True))
            for fp in [fp for fp in self._moments if fp not in (self.base_fingerprint, stats_fp)]:
                del self._moments[fp]  # keep the unedited model's and the latest edited weights' only
            progress(0.6, "context templates")
            key = f"{method}:{hp.context_template_length_params}:{hp.template_seed}"
            templates = self._templates.get((self.base_fingerprint, key)) or self._templates.get((self.fingerprint, key))
            if templates is None:
                starts = hp.template_starts if isinstance(hp, MEMITHyperParams) else None
                lengths = [tuple(p) for p in hp.context_template_length_params]
                templates = context_templates(model, tok, lengths, seed=hp.template_seed, starts=starts,
                                              fingerprint=self.fingerprint)  # the weights generating them
                for old in [k for k in self._templates if k[1] == key and k[0] != self.base_fingerprint]:
                    del self._templates[old]  # keep the unedited model's and the latest edited weights' only
                self._templates[(self.fingerprint, key)] = templates
            arch = arch_for(model)
            counter = _count_calls(get_module(model, arch.rewrite_at(hp.layers[-1])), hp.v_num_grad_steps + 3,
                                   progress.span(0.65, 0.95), "optimising the new value")
            progress(0.65, "optimising the new value")
            t_edit = time.perf_counter()
            with counter:
                moments = {layer: store[layer] for layer in hp.layers if layer in store}
                if method == "memit":
                    patch = compute_memit(model, tok, [request], hp, second_moment=moments, templates=templates)
                else:
                    patch, _ = compute_rome(model, tok, request, hp, second_moment=moments, templates=templates)
            edit_seconds = time.perf_counter() - t_edit
            progress(0.95, "applying and checking")
            applied = AppliedPatch(id=secrets.token_hex(6), patch=patch, source="edit")
            self._apply(applied)
            after = probe(model, tok, checks, request.new_text, request.true_text)
            gen_after = generate(model, tok, request.text, max_new_tokens=generate_tokens) if generate_tokens else None
        rows = [{"kind": b["kind"], "text": b["text"], "before": _probe_view(b), "after": _probe_view(a)}
                for b, a in zip(before, after)]
        return {
            "patch": applied.summary(), "request": request.to_dict(), "method": patch.method, "layers": hp.layers,
            "target_new": request.new_text, "target_true": request.true_text, "checks": rows,
            "generation": {"prompt": request.text, "before": gen_before, "after": gen_after},
            "edit_seconds": round(edit_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        }

    # -- patches -------------------------------------------------------------------------
    def find_patch(self, patch_id: str) -> AppliedPatch | None:
        return next((p for p in self.patches if p.id == patch_id), None)

    def check_revertible(self, patch_id: str) -> AppliedPatch:
        entry = self.find_patch(patch_id)
        if entry is None:
            raise KeyError(patch_id)
        if self.patches[-1] is not entry:
            raise Conflict(f"patch {patch_id} is not the last applied one: revert {self.patches[-1].id} first "
                           "(patches are reverted in the reverse order of application)")
        return entry

    def revert(self, patch_id: str, progress: Progress) -> dict[str, Any]:
        with self.using_model(wait=3600):
            try:
                entry = self.check_revertible(patch_id)
            except KeyError:
                raise FactEditError(f"patch {patch_id} is no longer applied") from None
            progress(0.1, "restoring the original weights")
            entry.patch.revert(self.model)
            self.patches.pop()
            self.fingerprint = model_fingerprint(self.model)
        return {"reverted": entry.summary(), "fingerprint": self.fingerprint,
                "restored_base": self.fingerprint == self.base_fingerprint}

    def _apply(self, entry: AppliedPatch) -> None:
        """Apply a patch and push it on the stack (under ``lock``); the summary already exists."""
        try:
            entry.patch.apply(self.model)
        except Exception:
            self.fingerprint = model_fingerprint(self.model)  # stay truthful whatever happened
            raise
        self.patches.append(entry)
        self.fingerprint = model_fingerprint(self.model)

    def validate_upload(self, data: bytes) -> Patch:
        """Parse and check a patch file against the current model without touching its weights.

        The core's reader validates the format, the metadata's types, factor shapes and that each
        weight is named once; here the model identity, every entry's parameter name and shape,
        and the fingerprint the patch was computed on.
        """
        try:
            patch = Patch.from_bytes(data, source="uploaded file")
        except FactEditError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
            raise FactEditError(f"uploaded file is not a valid factedit patch: {type(exc).__name__}: {exc}") from exc
        self.check_upload(patch)
        return patch

    def check_upload(self, patch: Patch) -> None:
        """The checks of :meth:`validate_upload` after parsing (again under ``lock`` before applying);
        metadata types and duplicate entries are refused by the core's ``Patch.from_bytes``."""
        if not patch.entries:
            raise FactEditError("uploaded patch changes no weight")
        if patch.model_identity != self.identity:
            raise FactEditError(f"the patch was made for another model (identity {patch.model_identity[:40]}); "
                                f"the loaded model {self.name!r} is {self.identity}")
        params = dict(self.model.named_parameters())
        for e in patch.entries:
            if e.name not in params:
                raise FactEditError(f"the patch changes {e.name[:200]!r}, which this model does not have")
            if tuple(params[e.name].shape) != tuple(e.shape):
                raise FactEditError(f"patch entry {e.name!r} has shape {tuple(e.shape)}, "
                                    f"the model's weight is {tuple(params[e.name].shape)}")
        if patch.base_fingerprint != self.fingerprint:
            reverting_helps = bool(self.patches) and patch.base_fingerprint == self.base_fingerprint
            hint = " Revert the applied patches first." if reverting_helps else ""
            raise Conflict(f"the patch was computed on other weights (fingerprint {patch.base_fingerprint[:12]}, "
                           f"the model's is now {self.fingerprint[:12]}).{hint}")

    def apply_uploaded(self, patch: Patch, progress: Progress, generation: int | None = None) -> dict[str, Any]:
        with self.using_model(wait=3600):
            self.check_generation(generation, "upload")
            self.check_upload(patch)  # the model may have changed since the upload was validated
            entry = AppliedPatch(id=secrets.token_hex(6), patch=patch, source="upload")  # summary before applying
            progress(0.1, "applying the patch")
            self._apply(entry)  # the core checks identity, shapes and fingerprint again
        return {"patch": entry.summary(), "fingerprint": self.fingerprint}

    # -- switching models ----------------------------------------------------------------
    def switch(self, name: str, progress: Progress) -> dict[str, Any]:
        """Load another registered model in place of this one (only with no patch applied)."""
        with self.using_model(wait=3600):
            if self.patches:
                raise Conflict("revert the applied patches before switching models")
            if name == self.name:
                return {"model": name, "changed": False}
            progress(0.05, f"loading {name}")
            if self._loader is not None:
                model, tok = self._loader(name)
            else:
                from factedit.models import load_model

                device = next(self.model.parameters()).device
                model, tok = load_model(name, device=device, dtype=next(self.model.parameters()).dtype)
            self._set_model(model, tok, name)
        return {"model": name, "changed": True}


def _probe_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"top": row["top"], "p_target_new": row["p_target_new"], "p_target_true": row["p_target_true"]}
