"""Keys: the rewrite module's input at the subject's last token (ROME's k*, MEMIT's K).

One implementation for every method: a batched partial forward over prompts,
reading each requested layer's rewrite-module input and stopping after the
deepest one.

Several processes (``shared=True``, every rank of a torchrun job calling with the same prompts): the
forward batches are shared out, rank ``r`` running batches ``r, r + N, ...``, and the rows are gathered in
prompt order on every rank. The batches are those one process runs (the same prompts, the same padding),
so every rank returns exactly what one process returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit import distributed
from factedit.hooks import TraceDict
from factedit.models.architectures import ArchSpec
from factedit.models.placement import input_device, module_device
from factedit.text import SubjectPrompt, encode_with_subject, pad_id, pad_right


def lookup_position(prompt: SubjectPrompt, fact_token: str) -> int:
    """Where a fact is looked up: the subject's last token, or the prompt's last token."""
    if fact_token == "subject_last":
        return prompt.subject_last
    if fact_token == "last":
        return len(prompt.ids) - 1
    raise ValueError(f"unknown fact_token {fact_token!r}")


@torch.no_grad()
def module_inputs_at(
    model: nn.Module,
    names: Sequence[str],
    prompts: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    pad: int,
    batch_size: int = 64,
    output: bool = False,
    shared: bool = False,
) -> dict[str, torch.Tensor]:
    """Input (or, with ``output``, output) of each named module at one position per prompt.

    Returns ``{name: (n_prompts, d)}``, each on the device its module computes on (with a device map,
    layers differ: keys live on their rewrite layer's device). ``names`` must be in execution order;
    the forward stops after the last. ``shared``: when the ranks work together
    (:func:`factedit.distributed.collective`), each runs its share of the batches and all get every row.
    """
    device = input_device(model)
    homes = {name: module_device(model, name) for name in names}  # a hooked module's input may arrive elsewhere
    starts = list(range(0, len(prompts), batch_size))
    sharded = shared and distributed.collective()
    by_start: dict[int, dict[str, torch.Tensor]] = {}
    for start in distributed.shard(starts) if sharded else starts:
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        pos = torch.tensor(positions[start : start + batch_size])
        ids, mask = pad_right(chunk, pad, device)
        with TraceDict(model, names, retain_input=not output, retain_output=output, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        rows = torch.arange(len(chunk))
        by_start[start] = {}
        for name in names:
            act = tr[name].output if output else tr[name].input
            by_start[start][name] = act[rows.to(act.device), pos.to(act.device)].to(homes[name])
    if sharded:  # every rank gets every batch's rows, put back in prompt order below
        parts = distributed.all_gather_objects(
            {start: {name: rows.cpu() for name, rows in got.items()} for start, got in by_start.items()},
            f"gathering the {'outputs' if output else 'inputs'} of {names[-1]}",
        )
        by_start = {
            start: {name: rows.to(homes[name]) for name, rows in got.items()}
            for part in parts
            for start, got in part.items()
        }
    return {name: torch.cat([by_start[start][name] for start in starts]) for name in names}


def subject_keys(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    arch: ArchSpec,
    layers: Sequence[int],
    prompt: str,
    subject: str,
    templates: Sequence[str],
    fact_token: str = "subject_last",
) -> dict[int, torch.Tensor]:
    """Keys of one (prompt, subject) under every context template: ``{layer: (n_templates, d_in)}``.

    Row 0 is the bare prompt when ``templates[0] == "{}"``; the mean over rows is ROME's k*.
    """
    encoded = [encode_with_subject(tok, t.replace("{}", prompt), subject) for t in templates]
    positions = [lookup_position(p, fact_token) for p in encoded]
    layers = sorted(layers)
    names = [arch.rewrite_at(layer) for layer in layers]
    inputs = module_inputs_at(model, names, [p.ids for p in encoded], positions, pad=pad_id(tok))
    return {layer: inputs[name] for layer, name in zip(layers, names, strict=True)}


def mean_keys(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    arch: ArchSpec,
    layer: int,
    requests: Sequence,
    templates: Sequence[str],
    template_weights: Sequence[float],
    fact_token: str = "subject_last",
    *,
    batch_size: int = 64,
    shared: bool = False,
) -> torch.Tensor:
    """Weighted mean key of each request over the templates: ``(n_requests, d_in)``, batched passes of
    ``batch_size`` prompts (``shared``: shared out between the ranks, see :func:`module_inputs_at`)."""
    prompts, positions = [], []
    for request in requests:
        for template in templates:
            enc = encode_with_subject(tok, template.replace("{}", request.prompt), request.subject)
            prompts.append(enc.ids)
            positions.append(lookup_position(enc, fact_token))
    name = arch.rewrite_at(layer)
    keys = module_inputs_at(model, [name], prompts, positions, pad=pad_id(tok), batch_size=batch_size, shared=shared)[
        name
    ]
    weights = torch.tensor(template_weights, dtype=keys.dtype, device=keys.device)
    return (keys.view(len(requests), len(templates), -1) * weights[None, :, None]).sum(1)
