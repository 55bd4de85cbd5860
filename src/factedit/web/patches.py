"""The page's view of applied patches: ids and summaries over the library's :class:`PatchStack`,
and the checks an uploaded patch file passes before anything touches the model.

The stack (``factedit.editing.patch``) owns the weights: it applies, reverts the newest bit-exact
and refuses unsafe orders itself. What the page adds is an id per push (the URL of its revert and
download), where it came from and a summary built once from well-typed metadata, so that a
listing can never fail on a strange value in an uploaded file.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from factedit.editing.patch import AppliedPatch, Patch
from factedit.errors import FactEditError

log = logging.getLogger(__name__)


class Conflict(FactEditError):
    """The request is valid but not in the current state (e.g. reverting a patch that is not the last)."""


def new_patch_id() -> str:
    """12 hex digits: the only form the API's patch-id paths accept."""
    return secrets.token_hex(6)


def _text(value: Any, limit: int = 300) -> str | None:
    """A string from a patch's metadata, cut to ``limit`` characters; anything else is ``None``."""
    return value[:limit] if isinstance(value, str) else None


def _ints(value: Any, limit: int = 64) -> list[int] | None:
    if not isinstance(value, list):
        return None
    return [x for x in value[:limit] if isinstance(x, int) and not isinstance(x, bool)]


EMPTY_SUMMARY: dict[str, Any] = {
    "method": None,
    "request": {"text": None, "subject": None, "target_new": None, "target_true": None},
    "n_requests": 0,
    "weights": [],
    "layers": None,
}


def summarize_patch(patch: Patch) -> dict[str, Any]:
    """What the page lists about a patch, built only from well-typed metadata (never raises).

    Uploaded patches are validated by :func:`check_upload` first; this is the second line of
    defence, so that a listing can never fail on a strange value.
    """
    try:
        requests = patch.requests if isinstance(patch.requests, list) else []
        req = requests[0] if requests and isinstance(requests[0], dict) else {}
        prompt, subject = _text(req.get("prompt"), 1000), _text(req.get("subject"))
        text = prompt.replace("{}", subject, 1) if prompt is not None and subject is not None else None
        hparams = patch.hparams if isinstance(patch.hparams, dict) else {}
        entries = patch.entries if isinstance(patch.entries, (list, tuple)) else []
        return {
            "method": _text(patch.method, 40),
            "request": {
                "text": text,
                "subject": subject,
                "target_new": _text(req.get("target_new")),
                "target_true": _text(req.get("target_true")),
            },
            "n_requests": len(requests),
            "weights": [name for name in (_text(getattr(e, "name", None)) for e in entries[:256]) if name is not None],
            "layers": _ints(hparams.get("layers")),
        }
    except Exception:  # noqa: BLE001 - a summary must never break a listing
        log.exception("could not summarise a patch")
        return copy.deepcopy(EMPTY_SUMMARY)


@dataclass
class PatchListing:
    """One push on the session's stack as the page lists it: id, source and a summary made once,
    when the listing is created (for uploads: before the patch is applied).

    ``handle``: the stack's handle for this push, set once it is applied. ``bytes_held``: the bytes
    of replaced weights the stack keeps for it (what the server's patch-memory cap counts).
    """

    id: str
    patch: Patch
    source: str  # "edit" or "upload"
    created: float = field(default_factory=time.time)
    handle: AppliedPatch | None = field(default=None, repr=False)
    bytes_held: int = 0
    _summary: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._summary = summarize_patch(self.patch)

    def summary(self) -> dict[str, Any]:
        out = copy.deepcopy(self._summary)
        out.update({"id": self.id, "source": self.source, "created": self.created, "bytes_held": self.bytes_held})
        return out


def parse_upload(data: bytes) -> Patch:
    """A patch from uploaded bytes; every way a file can be malformed is a one-line :class:`FactEditError`.

    The core's reader validates the format, the metadata's types, factor shapes and that each
    weight is named once.
    """
    try:
        return Patch.from_bytes(data, source="uploaded file")
    except FactEditError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
        raise FactEditError(f"uploaded file is not a valid factedit patch: {type(exc).__name__}: {exc}") from exc


def check_upload(
    patch: Patch, model: nn.Module, *, name: str, identity: str, fingerprint: str, base_fingerprint: str, edited: bool
) -> None:
    """Whether ``patch`` fits the loaded model as it is now, without touching its weights: the model
    identity, every entry's parameter name and shape, and the fingerprint it was computed on
    (a :class:`Conflict` when only the model's current state is in the way)."""
    if not patch.entries:
        raise FactEditError("uploaded patch changes no weight")
    if patch.model_identity != identity:
        raise FactEditError(
            f"the patch was made for another model (identity {patch.model_identity[:40]}); "
            f"the loaded model {name!r} is {identity}"
        )
    params = dict(model.named_parameters())
    for e in patch.entries:
        if e.name not in params:
            raise FactEditError(f"the patch changes {e.name[:200]!r}, which this model does not have")
        if tuple(params[e.name].shape) != tuple(e.shape):
            raise FactEditError(
                f"patch entry {e.name!r} has shape {tuple(e.shape)}, "
                f"the model's weight is {tuple(params[e.name].shape)}"
            )
    if patch.base_fingerprint != fingerprint:
        hint = " Revert the applied patches first." if edited and patch.base_fingerprint == base_fingerprint else ""
        raise Conflict(
            f"the patch was computed on other weights (fingerprint {patch.base_fingerprint[:12]}, "
            f"the model's is now {fingerprint[:12]}).{hint}"
        )
