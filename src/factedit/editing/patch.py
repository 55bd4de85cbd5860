"""Edits as immutable patches; applying one returns a handle that undoes it bit-exact.

Data model
----------
A :class:`Patch` is plain, immutable data: per rewritten weight one :class:`PatchEntry`
with the change ``ΔW`` in the weight's (out, in) view, either as low-rank factors
``ΔW = left @ right`` (``left``: out×r, ``right``: r×in) or as a dense (out, in) matrix;
``transposed`` marks weights stored as (in, out) (GPT-2's Conv1D). Beside the entries it
keeps what it was computed on: the method, the requests, the hyper-parameters, the library
version, the architecture identity, the model's name (registry name or path) and the
*fingerprint* of the weights (:func:`~factedit.models.fingerprint.model_fingerprint`).

Applying
--------
``patch.apply(model)`` first checks the model: another architecture is refused, and so are
weights whose fingerprint differs from the patch's base (the model was edited since, or is
another checkpoint or dtype) unless ``force=True``. It then adds ``ΔW`` to each weight, all
or nothing, and returns an :class:`AppliedPatch`: the handle that owns the tensors it
replaced and the hash of every tensor it wrote. With a device map each weight is changed, kept
and restored on its own device; a weight offloaded by the device map (``meta`` on the module) is
refused before anything changes. ``handle.revert()`` copies the replaced
tensors back (bit-exact, no subtraction), but only while each weight still holds exactly
what the patch wrote: if a later patch changed the same weight, the revert is refused with
the name of the patch to revert first, so weights are never silently corrupted.

A module-level weak registry (model -> live handles, in application order) lets
``patch.revert(model)`` find the patch's own live handle; a patch that is not applied to
that model is refused. :class:`PatchStack` applies a sequence of patches to one model and
restores all of them from one snapshot of every touched weight (memory flat in the number
of steps).

Besides the fingerprint, each entry's ``base_sha256`` (the SHA-256 of the weight it was computed
on) must match the weight of that name: an entry renamed to another layer's weight is refused.

Files
-----
One ``.safetensors`` file: tensors keyed by weight name (``"<weight>.left"``, ``".right"``,
``".dense"``) and the metadata as JSON under the ``factedit_patch`` key of the header
(format ``factedit-patch-v3``), with a SHA-256 of every tensor and of the metadata under
``factedit_sha256`` (:mod:`factedit.integrity`): a file whose content does not match it is
refused, naming the file. Files written before checksums (``factedit-patch-v2``; the first layout
``factedit-patch-v1``, tensors keyed by entry index, ``"0.left"``) still load, with a warning when
they carry no checksum; a v3 file without one is refused. No ``.json`` sidecar is written: the
metadata lives in the header, ``factedit patch show [--json]`` prints it (reading only the
header through :mod:`factedit.safetensors_meta`), and a second copy could go stale.

``save_replaced`` / ``restore_replaced`` store the tensors a handle replaced in a small
safetensors file (format ``factedit-replaced-v1``), so that a model folder written with a
patch applied can be restored bit-exact later from that folder and the patch file alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factedit.errors import FactEditError
from factedit.integrity import load_signed, save_signed
from factedit.models.architectures import get_parameter
from factedit.models.fingerprint import forget_digests, model_fingerprint, model_identity, tensor_sha256
from factedit.models.placement import require_resident
from factedit.models.registry import registry_name
from factedit.paths import atomic_write_bytes
from factedit.safetensors_meta import read_metadata

log = logging.getLogger(__name__)

FORMAT = "factedit-patch-v3"  # v2 plus a content checksum, which v3 files must carry
FORMAT_V2 = "factedit-patch-v2"  # tensors keyed by weight name, no checksum required; read, never written
FORMAT_V1 = "factedit-patch-v1"  # tensors keyed by entry index ("0.left"); read, never written
_FORMATS = (FORMAT, FORMAT_V2, FORMAT_V1)
_PATCH_REMEDY = "do not use it: get a fresh copy or compute the edit again"
METADATA_KEY = "factedit_patch"
REPLACED_FORMAT = "factedit-replaced-v1"
REPLACED_FILE = "factedit-replaced.safetensors"
_TENSOR_PARTS = ("left", "right", "dense")


def model_name(model: nn.Module) -> str:
    """How messages and patch files name a model: its registry name (see ``models.registry``), else
    ``config._name_or_path`` (a folder or hub id), else ``""``."""
    name = registry_name(model)
    if name:
        return name
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _model_label(name: str, identity: str) -> str:
    return f"{name or 'an unnamed model'} (identity {identity[:16]})"


@dataclass(frozen=True, eq=False)
class PatchEntry:
    """The change to one weight, in its (out, in) view; ``transposed``: stored as (in, out) (GPT-2 Conv1D)."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False
    left: torch.Tensor | None = None  # B: (out, r)
    right: torch.Tensor | None = None  # A: (r, in)
    dense: torch.Tensor | None = None  # (out, in)
    base_sha256: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "factors"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name (``dense``, or ``left`` and ``right``)."""
        parts = {"dense": self.dense} if self.dense is not None else {"left": self.left, "right": self.right}
        return {part: t for part, t in parts.items() if t is not None}

    def delta(self) -> torch.Tensor:
        """ΔW in the parameter's own storage layout, float32."""
        if self.dense is not None:
            d = self.dense.float()
        else:
            d = self.left.float() @ self.right.float()
        return d.T if self.transposed else d

    def validate(self, *, values: bool = True) -> None:
        """Refuse factors that do not fit the weight's shape (and, with ``values``, non-finite ones)."""
        out_dim, in_dim = (self.shape[1], self.shape[0]) if self.transposed else (self.shape[0], self.shape[1])
        if self.dense is not None:
            ok = self.dense.ndim == 2 and tuple(self.dense.shape) == (out_dim, in_dim)
        else:
            ok = (
                self.left is not None
                and self.right is not None
                and self.left.ndim == 2
                and self.right.ndim == 2
                and self.left.shape[0] == out_dim
                and self.right.shape[1] == in_dim
                and self.left.shape[1] == self.right.shape[0]
            )
        if not ok:
            raise FactEditError(f"patch entry {self.name!r} has factors that do not fit a weight of shape {self.shape}")
        for t in self.tensors().values():
            if not t.is_floating_point():
                raise FactEditError(f"patch entry {self.name!r} holds {t.dtype} factors, not floating point")
            if values and not torch.isfinite(t).all():
                raise FactEditError(f"patch entry {self.name!r} contains non-finite values")


@dataclass(frozen=True, eq=False)
class Patch:
    """An edit as immutable data: weight changes plus what they were computed on (see the module docstring).

    ``entries``: one :class:`PatchEntry` per weight, ΔW in the (out, in) view (low-rank factors or dense).
    ``base_fingerprint`` / ``model_identity``: the weights and architecture it was computed on; ``apply``
    refuses others. ``model_name``: registry name or path of that model, for messages.
    ``apply(model) -> AppliedPatch``: the handle that reverts it bit-exact.
    Patches compare by identity (``eq=False``): two patches with equal numbers are still two edits.
    """

    method: str
    entries: tuple[PatchEntry, ...]
    base_fingerprint: str
    model_identity: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    model_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))

    @classmethod
    def for_model(
        cls, model: nn.Module, *, method: str, entries: Iterable[PatchEntry], base_fingerprint: str, **fields: Any
    ) -> Patch:
        """A patch computed on ``model`` (whose weights had ``base_fingerprint``): fills the model's
        identity, name and the library version."""
        from factedit.version import __version__

        fields.setdefault("version", __version__)
        return cls(
            method=method,
            entries=tuple(entries),
            base_fingerprint=base_fingerprint,
            model_identity=model_identity(model),
            model_name=model_name(model),
            **fields,
        )

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def describe(self) -> str:
        """A short label for messages: the method and the edited fact(s)."""
        requests = self.requests if isinstance(self.requests, list) else []
        if len(requests) == 1 and isinstance(requests[0], dict):
            r = requests[0]
            return f"{self.method} patch {str(r.get('subject', '?'))[:60]!r} -> {str(r.get('target_new', '?'))[:60]!r}"
        return f"{self.method} patch ({len(requests)} requests)"

    # -- applying -----------------------------------------------------------------
    def check(self, model: nn.Module, *, force: bool = False) -> None:
        """Refuse models this patch was not computed for: another architecture or shapes, other weights
        (fingerprint), or an entry whose weight is not the one it was computed on (``base_sha256``).
        ``force`` skips the two weight checks only."""
        identity = model_identity(model)
        if identity != self.model_identity:
            raise FactEditError(
                f"this patch was made for another model, {_model_label(self.model_name, self.model_identity)}; "
                f"this model is {_model_label(model_name(model), identity)}"
            )
        for entry in self.entries:
            param = get_parameter(model, entry.name)
            if tuple(param.shape) != tuple(entry.shape):
                raise FactEditError(
                    f"patch entry {entry.name!r} has shape {entry.shape}, the model's is {tuple(param.shape)}"
                )
        require_resident(model, self.weight_names, f"apply {self.describe()}")
        if not force:
            fingerprint = model_fingerprint(model)
            if fingerprint != self.base_fingerprint:
                raise FactEditError(
                    f"the weights of {model_name(model) or 'this model'} differ from those this patch was computed on "
                    f"({self.model_name or 'unnamed model'}, fingerprint {self.base_fingerprint[:12]}; "
                    f"this model's is {fingerprint[:12]}): it was edited since, or is another checkpoint or dtype; "
                    "revert the patches applied since, or pass force=True to apply anyway"
                )
            for entry in self.entries:  # the fingerprint covers the model; this ties each entry to its weight
                if entry.base_sha256 and tensor_sha256(get_parameter(model, entry.name)) != entry.base_sha256:
                    raise FactEditError(
                        f"patch entry {entry.name!r} was computed on another weight than this model's {entry.name} "
                        f"(hash {entry.base_sha256[:12]}, the model's is "
                        f"{tensor_sha256(get_parameter(model, entry.name))[:12]}): the entry was renamed or the file "
                        "was altered; refusing it, nothing was changed"
                    )

    def handle(self, model: nn.Module) -> AppliedPatch | None:
        """This patch's live handle on ``model``, if it is applied there."""
        return next((h for h in applied_patches(model) if h.patch is self), None)

    def is_applied(self, model: nn.Module) -> bool:
        return self.handle(model) is not None

    @torch.no_grad()
    def apply(self, model: nn.Module, *, force: bool = False) -> AppliedPatch:
        """Add the update to the model's weights (all or nothing); the handle reverts it bit-exact."""
        if self.is_applied(model):
            raise FactEditError(f"this patch ({self.describe()}) is already applied to this model")
        names = self.weight_names
        if len(set(names)) != len(names):
            raise FactEditError("patch has two entries for one weight; refusing it (a revert could not be exact)")
        for entry in self.entries:
            entry.validate(values=False)
        self.check(model, force=force)
        replaced: dict[str, torch.Tensor] = {}
        written: dict[str, str] = {}
        try:
            for entry in self.entries:
                param = get_parameter(model, entry.name)
                replaced[entry.name] = param.detach().clone()
                forget_digests(param)
                param.copy_((param.float() + entry.delta().to(param.device)).to(param.dtype))
                written[entry.name] = tensor_sha256(param)
        except BaseException:  # all or nothing: put back what was already written
            for name, original in replaced.items():
                _write(model, name, original)
            raise
        handle = AppliedPatch(self, model, replaced, written)
        with _registry_lock:
            _live.setdefault(model, []).append(handle)
        return handle

    def revert(self, model: nn.Module) -> Patch:
        """Undo this patch's live application to ``model`` (see :meth:`AppliedPatch.revert`)."""
        handle = self.handle(model)
        if handle is None:
            raise FactEditError(
                f"{self.describe()} is not applied to this model ({model_name(model) or type(model).__name__}) "
                "by this process, so there is nothing to revert; nothing was changed"
            )
        return handle.revert()

    def release(self, model: nn.Module) -> None:
        """Drop the replaced tensors of this patch's live handle on ``model`` (see :meth:`AppliedPatch.release`)."""
        handle = self.handle(model)
        if handle is not None:
            handle.release()

    # -- identity and files --------------------------------------------------------
    def content_digest(self) -> str:
        """Hash of what the patch changes and where it applies (entries' tensors, names, shapes, base)."""
        h = hashlib.sha256(f"{self.model_identity}|{self.base_fingerprint}".encode())
        for e in self.entries:
            h.update(f"|{e.name}|{list(e.shape)}|{e.transposed}|{e.kind}".encode())
            for part, t in e.tensors().items():
                h.update(f"{part}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(tensor_sha256(t).encode())
        return h.hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "version": self.version,
            "base_fingerprint": self.base_fingerprint,
            "model_identity": self.model_identity,
            "model_name": self.model_name,
            "requests": self.requests,
            "hparams": self.hparams,
            "info": self.info,
            "entries": [
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "transposed": e.transposed,
                    "base_sha256": e.base_sha256,
                    "kind": e.kind,
                }
                for e in self.entries
            ],
        }

    def to_bytes(self) -> bytes:
        """The patch file's bytes: tensors, metadata and their checksum (see the module docstring)."""
        tensors = {f"{e.name}.{part}": t for e in self.entries for part, t in e.tensors().items()}
        return save_signed(tensors, {METADATA_KEY: json.dumps(self.metadata())})

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors; a folder gets ``patch.safetensors``) atomically; returns the file."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "patch.safetensors" if path.suffix == "" else path.with_suffix(".safetensors")
        atomic_write_bytes(path, self.to_bytes())
        _remove_stale_sidecar(path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Patch:
        """Parse and check a patch file's bytes: the checksum first (any damage is refused, naming
        ``source``), then every metadata field, then the tensors against the entries."""
        tensors, _, verified = load_signed(data, source, required=False, remedy=_PATCH_REMEDY)
        meta = read_patch_metadata(data, source)
        if not verified:
            if meta["format"] == FORMAT:
                raise FactEditError(f"{source} has no content checksum, so it cannot be trusted; {_PATCH_REMEDY}")
            log.warning("%s has no content checksum (written by an older factedit); it cannot be verified", source)
        by_name = meta["format"] != FORMAT_V1  # v1 files key tensors by entry index
        entries, used = [], set()
        for i, e in enumerate(meta["entries"]):
            parts = ("dense",) if e["kind"] == "dense" else ("left", "right")
            found = {}
            for part in parts:
                key = f"{e['name'] if by_name else i}.{part}"
                if key not in tensors:
                    raise FactEditError(f"{source}: patch is missing the tensor {key!r}")
                found[part] = tensors[key]
                used.add(key)
            entries.append(
                PatchEntry(
                    name=e["name"],
                    shape=tuple(e["shape"]),
                    transposed=e["transposed"],
                    base_sha256=e.get("base_sha256", ""),
                    **found,
                )
            )
        if set(tensors) - used:
            raise FactEditError(f"{source}: patch holds tensors no entry uses: {sorted(set(tensors) - used)[:3]}")
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise FactEditError(f"{source}: patch has two entries for one weight")
        for entry in entries:
            entry.validate()
        return cls(
            method=meta["method"],
            entries=tuple(entries),
            base_fingerprint=meta["base_fingerprint"],
            model_identity=meta["model_identity"],
            requests=meta.get("requests", []),
            hparams=meta.get("hparams", {}),
            info=meta.get("info", {}),
            version=meta.get("version", ""),
            model_name=meta.get("model_name", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        path = _patch_file(path)
        return cls.from_bytes(path.read_bytes(), source=str(path))

    def summary(self) -> str:
        lines = [
            f"method: {self.method}  (factedit {self.version})",
            f"model: {_model_label(self.model_name, self.model_identity)}",
            f"base model fingerprint: {self.base_fingerprint}",
        ]
        for e in self.entries:
            rank = "dense" if e.dense is not None else f"rank {e.left.shape[1]}"
            lines.append(f"  {e.name}  {tuple(e.shape)}  {rank}  |ΔW|={float(e.delta().norm()):.4g}")
        for r in self.requests:
            text = str(r.get("prompt", "")).replace("{}", str(r.get("subject", "{}")))
            lines.append(f"  request: {text} -> {r.get('target_new')}")
        return "\n".join(lines)


def _patch_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "patch.safetensors"
    if not path.is_file():
        raise FactEditError(f"patch file not found: {path}")
    return path


def _remove_stale_sidecar(path: Path) -> None:
    """Earlier versions wrote ``patch.json`` beside the file; one left from an older save would now lie."""
    sidecar = path.with_suffix(".json")
    try:
        if sidecar.is_file() and str(json.loads(sidecar.read_text()).get("format", "")).startswith("factedit-patch"):
            sidecar.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def read_patch_metadata(source: bytes | str | Path, name: str | None = None) -> dict[str, Any]:
    """A patch file's metadata, type-checked, without loading its tensors (a folder reads ``patch.safetensors``)."""
    if isinstance(source, (str, Path)):
        source = _patch_file(source)
    label = name or (str(source) if isinstance(source, Path) else "<bytes>")
    try:
        raw = read_metadata(source, label)
    except FactEditError as exc:
        raise FactEditError(f"{label} is not a valid factedit patch (corrupt or truncated): {exc}") from exc
    if METADATA_KEY not in raw:
        raise FactEditError(f"{label} is not a factedit patch (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FactEditError(f"{label} is corrupt (its metadata cannot be read: {exc}); {_PATCH_REMEDY}") from exc
    if not isinstance(meta, dict) or meta.get("format") not in _FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise FactEditError(f"{label}: unsupported patch format {found!r}")
    _check_metadata(meta, label)
    return meta


def _check_metadata(meta: Any, source: str) -> None:
    """Types of every metadata field, before any is used: a patch file is untrusted input."""

    def bad(what: str) -> FactEditError:
        return FactEditError(f"{source}: invalid patch metadata ({what})")

    if not isinstance(meta, dict):
        raise bad("not an object")
    for key in ("method", "base_fingerprint", "model_identity"):
        if not isinstance(meta.get(key), str):
            raise bad(f"{key} must be a string")
    for key in ("version", "model_name"):
        if not isinstance(meta.get(key, ""), str):
            raise bad(f"{key} must be a string")
    requests = meta.get("requests", [])
    if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
        raise bad("requests must be a list of objects")
    for r in requests:
        for key in ("prompt", "subject", "target_new", "target_true"):
            if r.get(key) is not None and not isinstance(r[key], str):
                raise bad(f"requests' {key} must be a string")
    for key in ("hparams", "info"):
        if not isinstance(meta.get(key, {}), dict):
            raise bad(f"{key} must be an object")
    layers = meta.get("hparams", {}).get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise bad("hparams.layers must be a list of integers")
    entries = meta.get("entries")
    if not isinstance(entries, list) or not entries:
        raise bad("entries must be a non-empty list")
    for e in entries:
        if not (
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and e["name"]
            and isinstance(e.get("shape"), list)
            and len(e["shape"]) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in e["shape"])
            and isinstance(e.get("transposed"), bool)
            and e.get("kind") in ("dense", "factors")
            and isinstance(e.get("base_sha256", ""), str)
        ):
            raise bad(f"entry {e.get('name') if isinstance(e, dict) else e!r} is malformed")


# -- applied patches ---------------------------------------------------------------------------------------------

_registry_lock = threading.RLock()
# model -> its live handles in application order; weak so a dropped model takes its handles with it
# (handles hold the model only weakly, or the entry would keep its own key alive).
_live: weakref.WeakKeyDictionary[nn.Module, list[AppliedPatch]] = weakref.WeakKeyDictionary()


def applied_patches(model: nn.Module) -> tuple[AppliedPatch, ...]:
    """The live (revertible) handles on ``model``, oldest first."""
    with _registry_lock:
        return tuple(_live.get(model, ()))


class AppliedPatch:
    """One application of a :class:`Patch` to one model: owns the tensors it replaced and the
    hashes of those it wrote, so :meth:`revert` restores the weights bit-exact or refuses.

    ``is_applied`` is True while the handle can undo its patch; it turns False after :meth:`revert`
    and after :meth:`release` (which keeps the patch's change but frees the replaced tensors).
    """

    def __init__(self, patch: Patch, model: nn.Module, replaced: dict[str, torch.Tensor], written: dict[str, str]):
        self.patch = patch
        self._model = weakref.ref(model)
        self._replaced: dict[str, torch.Tensor] | None = replaced
        self._written = dict(written)
        self._state = "applied"

    def __repr__(self) -> str:
        return f"AppliedPatch({self.patch.describe()}, {self._state})"

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise FactEditError("the model this patch was applied to no longer exists")
        return model

    @property
    def is_applied(self) -> bool:
        return self._state == "applied" and self._model() is not None

    @property
    def state(self) -> str:
        """``applied``, ``reverted`` or ``released``."""
        return self._state

    @property
    def written(self) -> Mapping[str, str]:
        """SHA-256 of every weight as this handle wrote it, by name."""
        return dict(self._written)

    def replaced(self) -> dict[str, torch.Tensor]:
        """The tensors this application replaced, by weight name (shared, do not modify)."""
        self._require_applied("read the replaced weights of")
        return dict(self._replaced)

    def _require_applied(self, what: str) -> nn.Module:
        if self._state == "reverted":
            raise FactEditError(f"cannot {what} {self.patch.describe()}: it was already reverted")
        if self._state == "released":
            raise FactEditError(
                f"cannot {what} {self.patch.describe()}: its handle was released (the replaced "
                "weights are no longer kept); restore the model from a snapshot instead"
            )
        return self.model

    def blockers(self) -> list[AppliedPatch]:
        """Live handles applied after this one that changed one of its weights, newest first."""
        mine = set(self.patch.weight_names)
        with _registry_lock:
            live = list(_live.get(self._model(), ())) if self._model() is not None else []
        later = live[live.index(self) + 1 :] if self in live else []
        return [h for h in reversed(later) if mine & set(h.patch.weight_names)]

    @torch.no_grad()
    def revert(self, model: nn.Module | None = None) -> Patch:
        """Copy the replaced weights back (bit-exact); refuses, changing nothing, when a later patch
        or anything else has changed one of them since. ``model``, if given, must be the handle's."""
        if model is not None and model is not self._model():
            raise FactEditError(f"{self.patch.describe()} was applied to another model object than this one")
        model = self._require_applied("revert")
        with _registry_lock:
            blockers = self.blockers()
            if blockers:
                names = sorted(set(self.patch.weight_names) & {n for b in blockers for n in b.patch.weight_names})
                raise FactEditError(
                    f"cannot revert {self.patch.describe()}: revert {', '.join(b.patch.describe() for b in blockers)} "
                    f"first (applied after it, changing {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); "
                    "nothing was changed"
                )
            for name, sha in self._written.items():
                if tensor_sha256(get_parameter(model, name)) != sha:
                    raise FactEditError(
                        f"cannot revert {self.patch.describe()}: {name} changed since it was applied (by a released "
                        "patch or a direct write); restoring it would discard that change, so nothing was changed"
                    )
            for name, original in self._replaced.items():
                _write(model, name, original)
            self._forget("reverted")
        return self.patch

    def release(self) -> None:
        """Keep the patch's change but stop tracking it: frees the replaced tensors, for long
        sequences whose caller restores the weights itself (e.g. :class:`PatchStack` snapshots)."""
        if self._state == "applied":
            self._forget("released")

    def _forget(self, state: str) -> None:
        with _registry_lock:
            model = self._model()
            handles = _live.get(model, []) if model is not None else []
            if self in handles:
                handles.remove(self)
            if model is not None and not handles:
                _live.pop(model, None)
        self._replaced = None
        self._state = state


class PatchStack:
    """Patches applied to one model in sequence: :meth:`pop` undoes the newest bit-exact,
    :meth:`revert_all` restores every touched weight from one snapshot.

    The snapshot holds each weight as it was the first time a push touched it (shared with that
    push's replaced tensors, so it costs no extra copy). ``undo_depth``: how many of the newest
    pushes keep their replaced tensors so that :meth:`pop` can undo them; ``None`` keeps all
    (short lists such as the web app's), ``0`` keeps none (long sequences: memory stays one
    snapshot however many steps). Older pushes are released; popping one is refused.
    """

    def __init__(self, model: nn.Module, *, undo_depth: int | None = None):
        if undo_depth is not None and undo_depth < 0:
            raise FactEditError("undo_depth must be >= 0 or None")
        self.model = model
        self.undo_depth = undo_depth
        self._handles: list[AppliedPatch] = []
        self._snapshot: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def handles(self) -> tuple[AppliedPatch, ...]:
        """Every push still on the stack, oldest first (released ones included)."""
        return tuple(self._handles)

    @property
    def patches(self) -> tuple[Patch, ...]:
        return tuple(h.patch for h in self._handles)

    @property
    def snapshot_names(self) -> tuple[str, ...]:
        """The weights the snapshot holds (touched by some push still on the stack)."""
        return tuple(self._snapshot)

    def push(self, patch: Patch, *, force: bool = False) -> AppliedPatch:
        """Apply ``patch`` on top of the stack (checks as :meth:`Patch.apply`)."""
        handle = patch.apply(self.model, force=force)
        for name, original in handle._replaced.items():
            self._snapshot.setdefault(name, original)
        self._handles.append(handle)
        if self.undo_depth is not None:
            revertible = [h for h in self._handles if h.is_applied]
            for old in revertible[: max(0, len(revertible) - self.undo_depth)]:
                old.release()
        return handle

    def pop(self) -> Patch:
        """Revert the newest push bit-exact and return its patch."""
        if not self._handles:
            raise FactEditError("the patch stack is empty: nothing to revert")
        top = self._handles[-1]
        if top.state == "released":
            raise FactEditError(
                f"cannot pop {top.patch.describe()}: the stack keeps the replaced weights of only its "
                f"{self.undo_depth} newest pushes; use revert_all to restore the snapshot"
            )
        if top.state == "applied":
            top.revert()
        self._handles.pop()
        self._drop_untouched()
        return top.patch

    @torch.no_grad()
    def revert_all(self) -> list[Patch]:
        """Restore every weight the stack touched from the snapshot (bit-exact) and empty the stack;
        returns the patches, oldest first. Refused if a patch applied outside the stack changed one of them."""
        mine = set(self._handles)
        foreign = [
            h for h in applied_patches(self.model) if h not in mine and set(h.patch.weight_names) & set(self._snapshot)
        ]
        if foreign:
            raise FactEditError(
                f"cannot revert the stack: {', '.join(h.patch.describe() for h in foreign)} was "
                "applied outside it to the same weights; revert it first"
            )
        for name, original in self._snapshot.items():
            _write(self.model, name, original)
        patches = [h.patch for h in self._handles]
        for handle in reversed(self._handles):
            if handle.is_applied:
                handle._forget("reverted")
        self._handles.clear()
        self._snapshot.clear()
        return patches

    def _drop_untouched(self) -> None:
        touched = {n for h in self._handles for n in h.patch.weight_names}
        for name in [n for n in self._snapshot if n not in touched]:
            del self._snapshot[name]


# -- the replaced weights of a written model folder ---------------------------------------------------------------


def save_replaced(handle: AppliedPatch, path: str | Path) -> Path:
    """Write the tensors ``handle`` replaced, with the hashes of what it wrote, so that
    :func:`restore_replaced` can later undo the patch on a model saved with it applied.

    The file is a safetensors file (tensors keyed by weight name, in the model's dtype) whose
    metadata names the patch (``patch_digest``: :meth:`Patch.content_digest`), the hashes of
    the written weights (``written``) and of the replaced ones (``replaced``), as JSON strings.
    """
    path = Path(path)
    tensors = handle.replaced()
    meta = {
        "format": REPLACED_FORMAT,
        "patch_digest": handle.patch.content_digest(),
        "patch": handle.patch.describe(),
        "written": json.dumps(handle.written),
        "replaced": json.dumps({name: tensor_sha256(t) for name, t in tensors.items()}),
    }
    atomic_write_bytes(path, save_signed(tensors, meta))
    return path


@torch.no_grad()
def restore_replaced(model: nn.Module, patch: Patch, path: str | Path) -> None:
    """Undo ``patch`` on ``model`` (loaded from a folder saved with it applied) from the tensors
    :func:`save_replaced` wrote; bit-exact, or refused with nothing changed."""
    path = Path(path)
    if not path.is_file():
        raise FactEditError(f"{path} not found: the model folder was not written by 'factedit patch apply'")
    meta = read_metadata(path)
    if meta.get("format") != REPLACED_FORMAT:
        raise FactEditError(f"{path}: not a factedit replaced-weights file (format {meta.get('format')!r})")
    if meta.get("patch_digest") != patch.content_digest():
        raise FactEditError(
            f"this model folder was written with another patch ({meta.get('patch', '?')[:120]}), not {patch.describe()}"
        )
    remedy = "write the model folder again with 'factedit patch apply'"
    tensors, meta, _ = load_signed(path, f"replaced-weights file {path}", required=False, remedy=remedy)
    try:
        written, replaced_sha = json.loads(meta["written"]), json.loads(meta["replaced"])
    except (KeyError, ValueError) as exc:
        raise FactEditError(f"{path} is corrupt or truncated ({exc}); {remedy}") from exc
    if not (
        isinstance(written, dict)
        and isinstance(replaced_sha, dict)
        and set(tensors) == set(written) == set(replaced_sha) == set(patch.weight_names)
    ):
        raise FactEditError(f"{path} does not hold the weights {patch.describe()} changes")
    require_resident(model, list(tensors), f"restore {patch.describe()}")
    for name, original in tensors.items():  # every check before the first write
        param = get_parameter(model, name)
        if param.dtype != original.dtype or tuple(param.shape) != tuple(original.shape):
            raise FactEditError(
                f"{name} is {param.dtype} {tuple(param.shape)} in this model but was saved as "
                f"{original.dtype} {tuple(original.shape)}: load the model with that dtype"
            )
        if tensor_sha256(param) != written[name]:
            raise FactEditError(f"{name} changed since the patch was applied and saved; refusing to restore it")
        if tensor_sha256(original) != replaced_sha[name]:
            raise FactEditError(f"{path} is corrupt: the saved {name} does not match its recorded hash")
    for name, original in tensors.items():
        _write(model, name, original)


def _write(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into the weight ``name`` (bit-exact) and drop its remembered digest."""
    param = get_parameter(model, name)
    with torch.no_grad():
        param.copy_(value.to(param.device))
    forget_digests(param)
