"""Edits as the web app offers them: the registry's methods, client-settable hyper-parameters, and the
JSON the page reads from an :class:`~factedit.editing.report.EditReport`.

The app has no method list of its own: every method of :mod:`factedit.editing.methods` that makes a
patch is offered, dispatched through :func:`get_method`, with its own hyper-parameter class deciding
which of :data:`EDITABLE_HPARAMS` a client may set.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from factedit.editing.hparams import HyperParams
from factedit.editing.methods import EditMethod, get_method, method_names
from factedit.editing.report import EditReport
from factedit.errors import FactEditError

# Hyper-parameters a client may override: numbers and layer lists only, nothing that names a file.
# Each method accepts those its hyper-parameter class has (ROME/MEMIT/AlphaEdit: v_*, clamp, KL; FT: steps, lr...).
EDITABLE_HPARAMS = (
    "layers",
    "v_num_grad_steps",
    "v_lr",
    "v_weight_decay",
    "clamp_norm_factor",
    "kl_factor",
    "num_steps",
    "lr",
    "weight_decay",
    "norm_constraint",
)

# Registry methods the app does not offer as edits: "none" makes no patch, so there would be nothing to
# list, download or revert (the page's before/after of the unedited model is its prediction panel).
NOT_EDITS = ("none",)


def edit_method_names() -> list[str]:
    """The registry's methods, in its order, less :data:`NOT_EDITS`."""
    return [name for name in method_names() if name not in NOT_EDITS]


def edit_method(name: str) -> EditMethod:
    """The registry method ``name``, if the app offers it (a one-line error otherwise)."""
    if name not in edit_method_names():
        raise FactEditError(f"unknown method {name!r}: choose one of {', '.join(edit_method_names())}")
    return get_method(name)


def settable_hparams(method: EditMethod) -> list[str]:
    """The :data:`EDITABLE_HPARAMS` that exist on ``method``'s hyper-parameter class."""
    fields = method.hparams_class.model_fields if method.hparams_class is not None else {}
    return [name for name in EDITABLE_HPARAMS if name in fields]


def resolve_hparams(
    model: nn.Module, name: str, server: dict[str, Any] | None = None, client: dict[str, Any] | None = None
) -> HyperParams:
    """The method's defaults for ``model``, then the server's settings (those its class has), then the
    client's: only :func:`settable_hparams` of that method, validated by the class (bad values: 400)."""
    method = edit_method(name)
    fields = method.hparams_class.model_fields if method.hparams_class is not None else {}
    changes = {k: v for k, v in (client or {}).items() if v is not None}
    allowed = settable_hparams(method)
    bad = sorted(set(changes) - set(allowed))
    if bad:
        raise FactEditError(
            f"hyper-parameter(s) {bad} cannot be set for method {name!r}; allowed: {', '.join(allowed)}"
        )
    overrides = {k: v for k, v in (server or {}).items() if k in fields}
    overrides.update(changes)
    hp = method.hparams(model, overrides=overrides or None)
    if hp is None:  # pragma: no cover - NOT_EDITS holds the methods without hyper-parameters
        raise FactEditError(f"method {name!r} takes no hyper-parameters")
    return hp


def edit_defaults(model: nn.Module, server: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per offered method, the default value of each hyper-parameter a client may set for it
    (what the page shows as placeholders); methods with no defaults for this model are left out."""
    out = {}
    for name in edit_method_names():
        try:
            hp = resolve_hparams(model, name, server)
        except FactEditError:
            continue
        out[name] = {k: getattr(hp, k) for k in settable_hparams(get_method(name))}
    return out


def method_catalogue() -> list[dict[str, Any]]:
    """What the page's method menu shows: name, description and the settable hyper-parameters."""
    return [
        {"name": name, "description": get_method(name).description, "hparams": settable_hparams(get_method(name))}
        for name in edit_method_names()
    ]


def _probe_view(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    if probe is None:
        return None
    return {"top": probe["top"], "p_target_new": probe["p_target_new"], "p_target_true": probe["p_target_true"]}


def report_json(report: EditReport, patch: dict[str, Any] | None) -> dict[str, Any]:
    """The page's view of a one-request report: before/after rows, generations, timings, the verdict.

    ``patch``: the summary of the listing the edit was pushed as (``None`` if it made none).
    """
    request = report.requests[0]
    generation = report.generations[0] if report.generations else {}
    return {
        "patch": patch,
        "request": request.to_dict(),
        "method": report.method,
        "layers": report.layers,
        "target_new": request.new_text,
        "target_true": request.true_text,
        "checks": [
            {"kind": row.kind, "text": row.text, "before": _probe_view(row.before), "after": _probe_view(row.after)}
            for row in report.rows
        ],
        "generation": {"prompt": request.text, "before": generation.get("before"), "after": generation.get("after")},
        "landed": bool(report.landed and report.landed[0]),
        "converged": bool(report.converged and report.converged[0]),
        "summary": report.summary_line(),
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
        "edit_seconds": round(report.edit_seconds, 2),
        "seconds": round(report.seconds, 2),
    }
