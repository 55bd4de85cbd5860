"""The fast runner: the official numbers with less work (``method="fast"``).

A restoration at (t, l) changes no state below its first restored layer (those come
from the corrupted run, served by :class:`~factedit.hooks.KnownOutput` stubs in
place of the skipped blocks) and no state at tokens before ``t`` (the corrupted
run's keys/values are a prefix cache, as in :mod:`factedit.editing.values`); only
the last token's answer probability is read (the forward stops at the final norm,
the LM head runs on one vector per row). Restorations that start at the same block
share forwards, packed along the sequence without padding, at most ``batch_size``
restorations × noise samples per forward.

Devices: the packed ids, positions and masks are made on the embedding's device; each
restored or frozen state is put on the device of the module whose output it replaces.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch

from factedit.errors import FactEditError
from factedit.hooks import Trace, TraceDict, known_blocks
from factedit.models.cache import full_cache, prefix_states
from factedit.models.masks import attention_masks
from factedit.models.runtime import lm_logits
from factedit.progress import Stage
from factedit.tracing.kinds import SEVERED_KINDS, window_layers
from factedit.tracing.runs import FactRuns, Restoration


def packed_masks(
    model: torch.nn.Module, t_slot: torch.Tensor, job_slot: torch.Tensor, pos: torch.Tensor, past: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive (1, 1, S, P+S) mask(s) for restorations packed into one sequence.

    Slot ``q`` (of restoration ``job_slot[q]``, which restarts at token ``t_slot[q]``)
    sees the cached corrupted keys of tokens ``< t`` and, causally, the slots of its
    own restoration. Packing breaks the model's own mask construction, so the model's
    sliding-window policy is applied by :func:`factedit.models.masks.attention_masks`.
    """
    device = t_slot.device
    n = t_slot.numel()
    past_ok = torch.arange(past, device=device)[None, :] < t_slot[:, None]
    idx = torch.arange(n, device=device)
    own_ok = (job_slot[:, None] == job_slot[None, :]) & (idx[:, None] >= idx[None, :])
    allowed = torch.cat([past_ok, own_ok], dim=1)
    key_pos = torch.cat([torch.arange(past, device=device), pos])
    try:
        return attention_masks(model, allowed, pos, key_pos)
    except FactEditError as exc:
        raise FactEditError(f"fast tracing: {exc}; use method='straightforward'") from exc


class FastTracer:
    """Runs restorations from their first changed layer and token on, many per forward.

    Restorations that start at the same block are packed: batch row ``n`` is noise
    sample ``n``; along the sequence, each restoration occupies the slots of its
    tokens ``t … T-1`` (no padding), attends to the corrupted prefix cache before its
    ``t`` and causally to its own slots (:func:`packed_masks`).
    """

    max_slots = 512  # bounds the packed sequence (attention cost grows with its square)

    def __init__(self, fact: FactRuns, answer_id: int, window: int, batch_size: int, sever_all_tokens: bool) -> None:
        self.f = fact
        self.answer_id = answer_id
        self.window = window
        self.batch_size = batch_size
        self.sever_all_tokens = sever_all_tokens

    def start_layer(self, kind: str, layer: int) -> int:
        """The first block a restoration of ``kind`` centred at ``layer`` changes."""
        if kind in ("mlp", "attn"):
            return window_layers(layer, self.window, self.f.n_layers).start
        return layer + 1  # hidden and severed: block ``layer``'s output is known

    def run(self, jobs: list[Restoration], stage: Stage) -> np.ndarray:
        """Scores of ``jobs`` (in their order), advancing ``stage`` by one per restoration done."""
        scores = np.empty(len(jobs))
        groups: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.start].append(i)
        per_chunk = max(1, self.batch_size // self.f.samples)
        T = len(self.f.ids)
        for start in sorted(groups):
            chunk: list[int] = []
            slots = 0
            for i in sorted(groups[start], key=lambda i: jobs[i].t):
                n = T - jobs[i].t
                if chunk and (len(chunk) >= per_chunk or slots + n > self.max_slots):
                    scores[chunk] = self._chunk([jobs[k] for k in chunk], start)
                    stage.advance(len(chunk))
                    chunk, slots = [], 0
                chunk.append(i)
                slots += n
            if chunk:
                scores[chunk] = self._chunk([jobs[k] for k in chunk], start)
                stage.advance(len(chunk))
        return scores

    def _chunk(self, jobs: list[Restoration], start: int) -> np.ndarray:
        f, arch, model = self.f, self.f.arch, self.f.model
        N, T, dev = f.samples, len(f.ids), f.device
        lengths = [T - j.t for j in jobs]
        first_slot = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        job_slot = torch.repeat_interleave(torch.arange(len(jobs), device=dev), torch.tensor(lengths, device=dev))
        t_slot = torch.tensor([j.t for j in jobs], device=dev)[job_slot]
        pos = t_slot + torch.arange(job_slot.numel(), device=dev) - torch.tensor(first_slot, device=dev)[job_slot]
        past = max(j.t for j in jobs)
        masks = packed_masks(model, t_slot, job_slot, pos, past)
        mask = (
            {k: m.expand(N, -1, -1, -1) for k, m in masks.items()}
            if isinstance(masks, dict)
            else masks.expand(N, -1, -1, -1)
        )
        cache = full_cache(prefix_states(f.corr_kv, past, first_layer=start))

        # Edits of module outputs: name -> [(slots, values (N, len(slots), d))].
        edits: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        known = f.corr_h[start - 1][:, pos.to(f.corr_h[start - 1].device)].clone() if start > 0 else None
        for job, s0 in zip(jobs, first_slot, strict=True):
            if job.kind in ("mlp", "attn"):
                clean = f.clean_mlp if job.kind == "mlp" else f.clean_attn
                slot = torch.tensor([s0], device=dev)
                for layer in window_layers(job.layer, self.window, f.n_layers):
                    name = arch.mlp_at(layer) if job.kind == "mlp" else arch.attn_at(layer)
                    edits[name].append((slot, clean[layer][job.t].expand(N, 1, -1)))
                continue
            known[:, s0] = f.clean_h[job.layer][job.t].to(known.device)
            if job.kind in SEVERED_KINDS:
                toks = torch.arange(job.t, T if self.sever_all_tokens else job.t + 1, device=dev)
                for layer in range(job.layer + 1, f.n_layers):
                    name = arch.mlp_at(layer) if job.kind == "hidden_sever_mlp" else arch.attn_at(layer)
                    edits[name].append((toks - job.t + s0, f.corr_sever[name][:, toks.to(f.corr_sever[name].device)]))
        merged = {
            name: (torch.cat([s for s, _ in lst]), torch.cat([v for _, v in lst], dim=1)) for name, lst in edits.items()
        }

        def put(out: torch.Tensor, name: str) -> torch.Tensor:
            slots, values = merged[name]
            return out.index_copy(1, slots.to(out.device), values.to(out.device, out.dtype))

        # From block 0 on, the blocks read the corrupted embeddings of the packed tokens.
        embed = (
            Trace(
                model,
                arch.embed,
                retain_output=False,
                edit_output=lambda out, name: f.corr_embed[:, pos.to(f.corr_embed.device)].to(out.device, out.dtype),
            )
            if start == 0
            else contextlib.nullcontext()
        )
        ids = f.ids[pos].expand(N, -1)
        with (
            torch.no_grad(),
            known_blocks(model, arch, start, known),
            embed,
            TraceDict(model, list(merged), retain_output=False, edit_output=put),
            Trace(model, arch.final_norm, stop=True) as fin,
        ):
            model(input_ids=ids, attention_mask=mask, position_ids=pos.expand(N, -1), cache=cache, use_cache=True)
        last = torch.tensor([s0 + n - 1 for s0, n in zip(first_slot, lengths, strict=True)], device=dev)
        hidden = fin.output[:, last.to(fin.output.device)]  # (N, jobs, d)
        probs = torch.softmax(lm_logits(model, arch, hidden).float(), dim=-1)[..., self.answer_id]
        return probs.mean(0).cpu().numpy()
