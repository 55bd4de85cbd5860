"""Edits as small, revertible patch files.

A :class:`Patch` holds, per rewritten weight, low-rank factors ``ΔW = B @ A``
(``B``: out×r, ``A``: r×in, in the weight's (out, in) view) or a dense delta,
plus metadata: method, requests, hyper-parameters, library version, and the
fingerprint of the weights it was computed on. ``apply`` keeps the original
tensors so ``revert`` restores them bit-exact.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from factedit.errors import FactEditError
from factedit.models.architectures import get_parameter
from factedit.models.fingerprint import model_fingerprint, model_identity, tensor_sha256
from factedit.paths import atomic_write_bytes

log = logging.getLogger(__name__)
FORMAT = "factedit-patch-v1"


@dataclass
class PatchEntry:
    """The change to one weight, in its (out, in) view; ``transposed``: stored as (in, out) (GPT-2 Conv1D)."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False
    left: torch.Tensor | None = None  # B: (out, r)
    right: torch.Tensor | None = None  # A: (r, in)
    dense: torch.Tensor | None = None  # (out, in)
    base_sha256: str = ""

    def delta(self) -> torch.Tensor:
        """ΔW in the parameter's own storage layout, float32."""
        if self.dense is not None:
            d = self.dense.float()
        else:
            d = self.left.float() @ self.right.float()
        return d.T if self.transposed else d

    def validate(self) -> None:
        out_dim, in_dim = (self.shape[1], self.shape[0]) if self.transposed else (self.shape[0], self.shape[1])
        if self.dense is not None:
            ok = tuple(self.dense.shape) == (out_dim, in_dim)
        else:
            ok = (self.left is not None and self.right is not None and self.left.ndim == 2 and self.right.ndim == 2
                  and self.left.shape[0] == out_dim and self.right.shape[1] == in_dim
                  and self.left.shape[1] == self.right.shape[0])
        if not ok:
            raise FactEditError(f"patch entry {self.name!r} has factors that do not fit a weight of shape {self.shape}")
        for t in (self.left, self.right, self.dense):
            if t is not None and not torch.isfinite(t).all():
                raise FactEditError(f"patch entry {self.name!r} contains non-finite values")


@dataclass
class Patch:
    method: str
    entries: list[PatchEntry]
    base_fingerprint: str
    model_identity: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    _backups: dict[int, tuple[weakref.ref, dict[str, torch.Tensor], dict[str, str]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    # -- applying -----------------------------------------------------------------
    def check(self, model: nn.Module, *, force: bool = False) -> None:
        """Refuse models this patch was not computed for (``force`` skips the weight check only)."""
        if model_identity(model) != self.model_identity:
            raise FactEditError(
                f"this patch was made for another model (identity {self.model_identity}, "
                f"this model is {model_identity(model)})"
            )
        for entry in self.entries:
            param = get_parameter(model, entry.name)
            if tuple(param.shape) != tuple(entry.shape):
                raise FactEditError(f"patch entry {entry.name!r} has shape {entry.shape}, the model's is {tuple(param.shape)}")
        if not force and model_fingerprint(model) != self.base_fingerprint:
            raise FactEditError(
                "the model's weights differ from those this patch was computed on "
                f"(patch {self.base_fingerprint[:12]}, model {model_fingerprint(model)[:12]}): it was edited "
                "since, or is another checkpoint or dtype; pass force=True to apply anyway"
            )

    def is_applied(self, model: nn.Module) -> bool:
        return id(model) in self._backups and self._backups[id(model)][0]() is model

    @torch.no_grad()
    def apply(self, model: nn.Module, *, force: bool = False) -> Patch:
        """Add the update to the model's weights, keeping the originals for a bit-exact revert."""
        if self.is_applied(model):
            raise FactEditError("this patch is already applied to this model")
        self.check(model, force=force)
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise FactEditError("patch has two entries for one weight; refusing it (a revert could not be exact)")
        originals: dict[str, torch.Tensor] = {}
        written: dict[str, str] = {}
        try:
            for entry in self.entries:
                param = get_parameter(model, entry.name)
                originals[entry.name] = param.detach().clone()
                new = (param.float() + entry.delta().to(param.device)).to(param.dtype)
                param.copy_(new)
                written[entry.name] = tensor_sha256(param)
        except BaseException:  # all or nothing: put back what was already written
            for name, original in originals.items():
                get_parameter(model, name).copy_(original)
            raise
        self._backups[id(model)] = (weakref.ref(model), originals, written)
        return self

    def release(self, model: nn.Module) -> None:
        """Forget the originals kept for :meth:`revert` (the caller restores the weights itself),
        so that long edit sequences do not hold one copy of the weights per step."""
        self._backups.pop(id(model), None)

    @torch.no_grad()
    def revert(self, model: nn.Module) -> Patch:
        """Undo :meth:`apply`: bit-exact when this object applied it, else by subtracting (approximate)."""
        if self.is_applied(model):
            _, originals, written = self._backups.pop(id(model))
            for entry in self.entries:
                param = get_parameter(model, entry.name)
                if tensor_sha256(param) != written[entry.name]:
                    log.warning("%s changed after the patch was applied; restoring the pre-patch value anyway", entry.name)
                param.copy_(originals[entry.name])
            return self
        log.warning("patch was not applied by this object: reverting by subtraction (not bit-exact)")
        for entry in self.entries:
            param = get_parameter(model, entry.name)
            param.copy_((param.float() - entry.delta().to(param.device)).to(param.dtype))
        return self

    # -- files ---------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "version": self.version,
            "base_fingerprint": self.base_fingerprint,
            "model_identity": self.model_identity,
            "requests": self.requests,
            "hparams": self.hparams,
            "info": self.info,
            "entries": [
                {"name": e.name, "shape": list(e.shape), "transposed": e.transposed, "base_sha256": e.base_sha256,
                 "kind": "dense" if e.dense is not None else "factors"}
                for e in self.entries
            ],
        }

    def to_bytes(self) -> bytes:
        tensors = {}
        for i, e in enumerate(self.entries):
            if e.dense is not None:
                tensors[f"{i}.dense"] = e.dense.detach().cpu().contiguous()
            else:
                tensors[f"{i}.left"] = e.left.detach().cpu().contiguous()
                tensors[f"{i}.right"] = e.right.detach().cpu().contiguous()
        return save_bytes(tensors, metadata={"factedit_patch": json.dumps(self.metadata())})

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and a readable ``.json`` beside it, atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "patch.safetensors" if path.suffix == "" else path.with_suffix(".safetensors")
        atomic_write_bytes(path, self.to_bytes())
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(self.metadata(), indent=2).encode())
        return path

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Patch:
        try:
            tensors = load_bytes(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["factedit_patch"])
        except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise FactEditError(f"{source} is not a valid factedit patch (corrupt or truncated): {exc}") from exc
        if meta.get("format") != FORMAT:
            raise FactEditError(f"{source}: unsupported patch format {meta.get('format')!r}")
        _check_metadata(meta, source)
        entries = []
        try:
            for i, e in enumerate(meta["entries"]):
                kind = e["kind"]
                entries.append(PatchEntry(
                    name=e["name"], shape=tuple(e["shape"]), transposed=bool(e["transposed"]),
                    base_sha256=e.get("base_sha256", ""),
                    dense=tensors[f"{i}.dense"] if kind == "dense" else None,
                    left=tensors[f"{i}.left"] if kind == "factors" else None,
                    right=tensors[f"{i}.right"] if kind == "factors" else None,
                ))
            patch = cls(method=meta["method"], entries=entries, base_fingerprint=meta["base_fingerprint"],
                        model_identity=meta["model_identity"], requests=meta.get("requests", []),
                        hparams=meta.get("hparams", {}), info=meta.get("info", {}), version=meta.get("version", ""))
        except KeyError as exc:
            raise FactEditError(f"{source}: patch is missing {exc}") from exc
        for entry in patch.entries:
            entry.validate()
        names = [e.name for e in patch.entries]
        if len(set(names)) != len(names):
            raise FactEditError(f"{source}: patch has two entries for one weight")
        return patch

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        path = Path(path)
        if path.is_dir():
            path = path / "patch.safetensors"
        if not path.is_file():
            raise FactEditError(f"patch file not found: {path}")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    def summary(self) -> str:
        lines = [f"method: {self.method}  (factedit {self.version})", f"base model fingerprint: {self.base_fingerprint}"]
        for e in self.entries:
            rank = "dense" if e.dense is not None else f"rank {e.left.shape[1]}"
            lines.append(f"  {e.name}  {tuple(e.shape)}  {rank}  |ΔW|={float(e.delta().norm()):.4g}")
        for r in self.requests:
            lines.append(f"  request: {r.get('prompt', '').replace('{}', r.get('subject', '{}'))} -> {r.get('target_new')}")
        return "\n".join(lines)


def _check_metadata(meta: Any, source: str) -> None:
    """Types of every metadata field, before any is used: a patch file is untrusted input."""
    def bad(what: str) -> FactEditError:
        return FactEditError(f"{source}: invalid patch metadata ({what})")

    if not isinstance(meta, dict):
        raise bad("not an object")
    for key in ("method", "base_fingerprint", "model_identity"):
        if not isinstance(meta.get(key), str):
            raise bad(f"{key} must be a string")
    if not isinstance(meta.get("version", ""), str):
        raise bad("version must be a string")
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
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("shape"), list)
                and len(e["shape"]) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                 for x in e["shape"])
                and isinstance(e.get("transposed"), bool) and e.get("kind") in ("dense", "factors")
                and isinstance(e.get("base_sha256", ""), str)):
            raise bad(f"entry {e.get('name') if isinstance(e, dict) else e!r} is malformed")
