"""What edits share and should compute once: second moments and context templates.

One :class:`EditResources` per loaded model, used by every front end (CLI, web app, evaluation
runner, sequential editor): memory over the core's disk caches, keyed by the fingerprint of the
weights they were computed on (every byte of every weight, see ``models/fingerprint.py``: a patch that
changes a single element gives other keys) and by their spec (:class:`StatsSpec`, :class:`TemplateSpec`).

Policy: statistics and templates are those of the *unedited* weights (the fingerprint when the
object was created), as in the papers' sequential setups. If an edit needs one that the unedited
model has not given yet while patches are applied, it is computed on the current weights and kept
under *their* fingerprint (the disk caches are keyed the same way), never filed as the unedited
model's. Memory holds the unedited model's entries and those of the latest other weights only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams, StatsSpec, TemplateSpec
from factedit.editing.templates import context_templates
from factedit.models.fingerprint import model_fingerprint
from factedit.progress import Progress
from factedit.stats.second_moment import second_moments

log = logging.getLogger(__name__)


class EditResources:
    """Second moments and context templates of one model, computed once and shared.

    ``corpus``: the text used when a spec names none (``StatsSpec.corpus is None``); ``None`` means the
    default local Wikipedia text. ``second_moment``: precomputed ``{layer: C}`` of the unedited weights
    for the default spec (e.g. a file given on the command line).
    """

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        *,
        corpus: str | Path | None = None,
        cache_folder: Path | None = None,
        second_moment: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.tok = model, tok
        self.corpus = str(corpus) if corpus is not None else None
        self.cache_folder = cache_folder
        self.base_fingerprint = model_fingerprint(model)
        self._moments: dict[tuple[str, StatsSpec, int], torch.Tensor] = {}
        self._templates: dict[tuple[str, TemplateSpec], list[str]] = {}
        self._given: dict[int, torch.Tensor] = dict(second_moment or {})

    # -- lookups ------------------------------------------------------------------------
    def _spec(self, spec: StatsSpec) -> StatsSpec:
        return (
            spec if spec.corpus is not None or self.corpus is None else spec.model_copy(update={"corpus": self.corpus})
        )

    def second_moments(
        self, layers: Iterable[int], spec: StatsSpec, progress: Progress | bool | None = None
    ) -> dict[int, torch.Tensor]:
        """``{layer: C}``: the unedited weights' when known, else computed (once) on the current weights."""
        spec = self._spec(spec)
        layers = sorted(set(layers))
        out: dict[int, torch.Tensor] = {layer: self._given[layer] for layer in layers if layer in self._given}
        for layer in layers:
            if layer not in out and (self.base_fingerprint, spec, layer) in self._moments:
                out[layer] = self._moments[(self.base_fingerprint, spec, layer)]
        missing = [layer for layer in layers if layer not in out]
        if not missing:
            return out
        current = model_fingerprint(self.model)
        for layer in list(missing):
            if (current, spec, layer) in self._moments:
                out[layer] = self._moments[(current, spec, layer)]
                missing.remove(layer)
        if missing:
            if current != self.base_fingerprint:
                log.info(
                    "statistics for layer(s) %s computed on the current (edited) weights %s", missing, current[:12]
                )
            computed = second_moments(
                self.model,
                self.tok,
                missing,
                corpus=spec.corpus,
                n_tokens=spec.n_tokens,
                max_length=spec.max_length,
                dtype=spec.dtype,
                cache_folder=self.cache_folder,
                progress=progress,
            )
            self._forget_other_weights(current)
            for layer, moment in computed.items():
                self._moments[(current, spec, layer)] = moment
                out[layer] = moment
        return out

    def templates(self, spec: TemplateSpec, progress: Progress | bool | None = None) -> list[str]:
        """Context templates for ``spec``: the unedited weights' when known, else the current weights'."""
        cached = self._templates.get((self.base_fingerprint, spec))
        if cached is not None:
            return list(cached)
        current = model_fingerprint(self.model)
        cached = self._templates.get((current, spec))
        if cached is None:
            cached = context_templates(
                self.model,
                self.tok,
                [tuple(p) for p in spec.length_params],
                seed=spec.seed,
                starts=list(spec.starts) if spec.starts is not None else None,
                cache_folder=self.cache_folder,
                fingerprint=current,
                progress=progress,
            )
            self._forget_other_weights(current)
            self._templates[(current, spec)] = cached
        return list(cached)

    def for_hparams(
        self,
        hp: HyperParams,
        progress: Progress | bool | None = None,
    ) -> tuple[dict[int, torch.Tensor] | None, list[str] | None]:
        """What a method with these hyper-parameters needs: ``(moments or None, templates or None)``."""
        templates = self.templates(hp.template_spec, progress) if hp.template_spec is not None else None
        moments = (
            self.second_moments(hp.layers, hp.stats_spec, progress)
            if hp.stats_spec is not None and hasattr(hp, "layers")
            else None
        )
        return moments, templates

    def moments_with(
        self, hp: HyperParams, given: dict[int, torch.Tensor] | None, progress: Progress | bool | None = None
    ) -> dict[int, torch.Tensor]:
        """``given`` statistics (e.g. passed by the caller) completed with the cached ones for ``hp.layers``."""
        missing = [layer for layer in hp.layers if not given or layer not in given]
        return {**(given or {}), **(self.second_moments(missing, hp.stats_spec, progress) if missing else {})}

    def _forget_other_weights(self, keep: str) -> None:
        """Drop entries of weights that are neither the unedited ones nor ``keep`` (bounded memory)."""
        for key in [k for k in self._moments if k[0] not in (self.base_fingerprint, keep)]:
            del self._moments[key]
        for key in [k for k in self._templates if k[0] not in (self.base_fingerprint, keep)]:
            del self._templates[key]
