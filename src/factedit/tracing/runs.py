"""The clean and corrupted runs of one fact, and what a restoration is.

* clean: the prompt as is; the answer is the model's top next token (unless given)
  and its probability is ``clean_prob``;
* corrupted: ``samples`` copies with Gaussian noise added to the *output of the
  embedding module* at the subject's tokens; the mean answer probability is
  ``low_prob``.

Both runs keep what the runners reuse: the clean states to put back, the corrupted
states, embeddings and keys/values to start restorations from. States are kept per
layer, each on the device its module computed it on (with a device map, layers differ).
With ``keep_graph`` the corrupted run is recorded by autograd from the noised embeddings on
(:class:`CorruptedGraph`), so attribution patching takes its gradients from this very run
instead of running the corrupted batch a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from factedit.hooks import Trace, TraceDict, frozen
from factedit.models.architectures import ArchSpec, num_layers
from factedit.models.cache import cache_states, full_cache
from factedit.models.placement import input_device
from factedit.models.runtime import lm_logits
from factedit.text import SubjectPrompt


@dataclass
class Restoration:
    """One restoration: ``kind`` at token ``t`` centred at layer ``layer``; blocks from ``start`` on must run."""

    kind: str
    t: int
    layer: int
    start: int


@dataclass
class CorruptedGraph:
    """The corrupted run's module outputs (``name -> (N, T, d)``) and final-norm output, still in the
    autograd graph that starts at the noised embeddings (parameters frozen: no weight gradients)."""

    outputs: dict[str, torch.Tensor]
    final: torch.Tensor


class FactRuns:
    """Clean and corrupted activations of one fact: everything a restoration can reuse."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        encoded: SubjectPrompt,
        noise: torch.Tensor,
        kinds: Sequence[str],
        keep_corrupted_kv: bool,
        keep_graph: bool = False,
    ) -> None:
        self.model, self.arch = model, arch
        self.device = input_device(model)  # where the ids go
        self.n_layers = num_layers(model)
        self.ids = torch.tensor(encoded.ids, dtype=torch.long, device=self.device)
        self.first, self.last = encoded.subject_first, encoded.subject_last
        self.noise = noise  # (N, n_subject_tokens, d)
        self.samples = noise.shape[0]
        L = self.n_layers
        blocks = [arch.block(i) for i in range(L)]
        mlps = [arch.mlp_at(i) for i in range(L)]
        attns = [arch.attn_at(i) for i in range(L)]
        # Clean run: block, MLP and attention outputs at every token, and the next-token distribution.
        with (
            torch.no_grad(),
            TraceDict(model, blocks + mlps + attns) as td,
            Trace(model, arch.final_norm, stop=True) as fin,
        ):
            model(input_ids=self.ids[None], use_cache=False)
        self.clean_h = [td[n].output[0] for n in blocks]  # L x (T, d)
        self.clean_mlp = [td[n].output[0] for n in mlps]
        self.clean_attn = [td[n].output[0] for n in attns]
        self.clean_dist = torch.softmax(lm_logits(model, arch, fin.output[0, -1]).float(), dim=-1)
        # Corrupted run: noised copies; keep block outputs, embeddings, keys/values (and severed modules' outputs).
        sever = [n for k, ns in (("hidden_sever_mlp", mlps), ("hidden_sever_attn", attns)) if k in kinds for n in ns]
        batch = self.ids[None].expand(self.samples, -1)
        cache = full_cache() if keep_corrupted_kv else None  # full layers: keep every token's keys/values
        recorded = list(dict.fromkeys(blocks + sever + (mlps + attns if keep_graph else [])))

        def noised(x: torch.Tensor, name: str) -> torch.Tensor:
            x = self.add_noise(x)
            return x.requires_grad_(True) if keep_graph else x  # the graph starts at the noised embeddings

        with (
            torch.enable_grad() if keep_graph else torch.no_grad(),
            frozen(model) if keep_graph else nullcontext(),
            Trace(model, arch.embed, edit_output=noised) as emb,
            TraceDict(model, recorded, detach=not keep_graph) as td,
            Trace(model, arch.final_norm, stop=True, detach=not keep_graph) as fin,
        ):
            model(input_ids=batch, cache=cache, use_cache=keep_corrupted_kv)
        self.graph = CorruptedGraph({n: td[n].output for n in recorded}, fin.output) if keep_graph else None
        self.corr_embed = emb.output  # (N, T, d)
        self.corr_h = [td[n].output.detach() for n in blocks]  # L x (N, T, d)
        self.corr_sever = {n: td[n].output.detach() for n in sever}  # name -> (N, T, d)
        self.corr_kv = [(k.detach(), v.detach()) for k, v in cache_states(cache)] if cache is not None else None
        with torch.no_grad():
            self.corr_dists = torch.softmax(lm_logits(model, arch, fin.output[:, -1].detach()).float(), dim=-1)

    def take_graph(self) -> CorruptedGraph | None:
        """The recorded corrupted graph, handed over once (then released, so its memory goes with its user)."""
        graph, self.graph = self.graph, None
        return graph

    def add_noise(self, x: torch.Tensor, name: str = "") -> torch.Tensor:
        """Add the fixed noise samples at the subject tokens of rows 0..N-1 (or 1..N with a clean row 0)."""
        x = x.clone()
        rows = slice(x.shape[0] - self.samples, x.shape[0])
        x[rows, self.first : self.last + 1] += self.noise.to(x.device, x.dtype)
        return x
