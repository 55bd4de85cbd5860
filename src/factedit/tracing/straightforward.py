"""The official runner (``method="straightforward"``, kmeng01/rome ``causal_trace.py``).

Per restoration, one full forward of a batch holding the clean prompt (row 0) and the
noised copies; the restored states are copied from row 0, logits computed everywhere.
Slow, but the reference the fast runner must equal.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from factedit.hooks import TraceDict
from factedit.progress import Stage
from factedit.tracing.kinds import SEVERED_KINDS, window_layers
from factedit.tracing.runs import FactRuns, Restoration


class StraightTracer:
    """The official computation: per restoration one full forward of the clean prompt plus the noised copies."""

    def __init__(self, fact: FactRuns, answer_id: int, window: int, sever_all_tokens: bool) -> None:
        self.f = fact
        self.answer_id = answer_id
        self.window = window
        self.sever_all_tokens = sever_all_tokens

    def start_layer(self, kind: str, layer: int) -> int:
        """Every restoration runs the whole model."""
        return 0

    def run(self, jobs: list[Restoration], stage: Stage) -> np.ndarray:
        """Scores of ``jobs`` (in their order), advancing ``stage`` by one per restoration done."""
        scores = np.empty(len(jobs))
        for i, job in enumerate(jobs):
            scores[i] = self._one(job)
            stage.advance(1)
        return scores

    def _one(self, job: Restoration) -> float:
        f, arch, model = self.f, self.f.arch, self.f.model
        batch = f.ids[None].expand(f.samples + 1, -1)
        patch: dict[str, list[int]] = defaultdict(list)  # module -> tokens copied from the clean row 0
        unpatch: dict[str, list[int]] = defaultdict(list)  # module -> tokens frozen at corrupted values
        if job.kind in ("mlp", "attn"):
            for layer in window_layers(job.layer, self.window, f.n_layers):
                patch[arch.mlp_at(layer) if job.kind == "mlp" else arch.attn_at(layer)].append(job.t)
        else:
            patch[arch.block(job.layer)].append(job.t)
            if job.kind in SEVERED_KINDS:
                tokens = list(range(job.t, len(f.ids))) if self.sever_all_tokens else [job.t]
                for layer in range(job.layer + 1, f.n_layers):
                    name = arch.mlp_at(layer) if job.kind == "hidden_sever_mlp" else arch.attn_at(layer)
                    unpatch[name].extend(tokens)

        def edit(out: torch.Tensor, name: str) -> torch.Tensor:
            if name == arch.embed:
                return f.add_noise(out)
            out = out.clone()
            for t in patch.get(name, []):
                out[1:, t] = out[0, t]
            for t in unpatch.get(name, []):
                out[1:, t] = f.corr_sever[name][:, t]
            return out

        with torch.no_grad(), TraceDict(model, [arch.embed, *patch, *unpatch], retain_output=False, edit_output=edit):
            logits = model(input_ids=batch, use_cache=False).logits
        probs = torch.softmax(logits[1:, -1].float(), dim=-1)[:, self.answer_id]
        return float(probs.mean())
