"""factedit: locate and edit factual knowledge in transformer language models.

The public API is importable from here; names are loaded on first use (PEP 562), so that
``import factedit`` (and ``factedit --help``) does not import torch and transformers up front.
"""

from __future__ import annotations

import importlib
from typing import Any

from factedit.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models
    "load_model": "factedit.models.loading",
    "arch_for": "factedit.models.architectures",
    "model_fingerprint": "factedit.models.fingerprint",
    # requests, hyper-parameters, results, patches
    "EditRequest": "factedit.editing.requests",
    "load_requests": "factedit.editing.requests",
    "ROMEHyperParams": "factedit.editing.hparams",
    "MEMITHyperParams": "factedit.editing.hparams",
    "AlphaEditHyperParams": "factedit.editing.hparams",
    "EMMETHyperParams": "factedit.editing.hparams",
    "UltraEditHyperParams": "factedit.editing.hparams",
    "StatsSpec": "factedit.editing.hparams",
    "TemplateSpec": "factedit.editing.hparams",
    "EditResult": "factedit.editing.result",
    "Patch": "factedit.editing.patch",
    "PatchStack": "factedit.editing.patch",
    "AppliedPatch": "factedit.editing.patch",
    # methods and what they share
    "METHODS": "factedit.editing.methods",
    "EditMethod": "factedit.editing.methods",
    "get_method": "factedit.editing.methods",
    "method_names": "factedit.editing.methods",
    "register": "factedit.editing.methods",
    "EditResources": "factedit.editing.resources",
    "compute_rome": "factedit.editing.rome",
    "apply_rome": "factedit.editing.rome",
    "compute_memit": "factedit.editing.memit",
    "compute_alphaedit": "factedit.editing.alphaedit",
    "compute_emmet": "factedit.editing.emmet",
    "compute_ultraedit": "factedit.editing.ultraedit",
    "UltraEditState": "factedit.editing.ultraedit",
    "compute_ft": "factedit.editing.ft",
    "SequentialEditor": "factedit.editing.sequential",
    "edit_and_compare": "factedit.editing.report",
    "EditReport": "factedit.editing.report",
    "second_moments": "factedit.stats.second_moment",
    # locating and evaluating
    "causal_trace": "factedit.tracing.core",
    "run_evaluation": "factedit.evaluation.runner",
    # progress and errors
    "Progress": "factedit.progress",
    "TqdmProgress": "factedit.progress",
    "FactEditError": "factedit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'factedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
