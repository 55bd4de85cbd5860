"""Context templates: short texts the model itself writes, put before the prompt.

ROME averages keys (and optimises v*) over ``"{}"`` plus these prefixes so an
edit generalises beyond the exact prompt. Official recipe: 10 samples of 5
tokens and 10 of 10 tokens (top-k 5), each followed by ``". {}"``. Generation is
seeded; results are cached on disk per model fingerprint, in a checksummed envelope
(:func:`factedit.integrity.dumps_signed_json`): a damaged cache file is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.integrity import dumps_signed_json, loads_signed_json
from factedit.models.fingerprint import model_fingerprint
from factedit.models.placement import input_device, model_devices
from factedit.models.tokens import document_start_of
from factedit.paths import atomic_write_bytes, cache_dir
from factedit.progress import Progress, as_progress

log = logging.getLogger(__name__)
CACHE_FORMAT = "factedit-templates-v1"


def _start_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """Generation starts from the document-start token the model knows (BOS, else EOS)."""
    for token_id in (tok.bos_token_id, tok.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return tok("The")["input_ids"][:1]


def _per_start(n_gen: int, starts: list[str] | None) -> int:
    return n_gen if not starts else max(1, n_gen // len(starts))


def template_group_sizes(length_params: list[tuple[int, int]], starts: list[str] | None = None) -> list[int]:
    """How many templates each context type yields: 1 for ``"{}"``, then one count per (length, n)."""
    return [1] + [_per_start(n, starts) * (len(starts) if starts else 1) for _, n in length_params]


def template_weights(templates: Sequence[str], group_sizes: Sequence[int] | None = None) -> list[float]:
    """MEMIT's ``compute_ks``: average the keys within each context type, then over the types.

    ``group_sizes`` are the template counts of the types in order (the bare ``"{}"`` is the first
    type, of size 1); without them, or when they do not add up to the templates given, every
    template weighs the same.
    """
    if not group_sizes or sum(group_sizes) != len(templates):
        return [1.0 / len(templates)] * len(templates)
    groups = [g for g in group_sizes if g > 0]
    return [1.0 / (len(groups) * g) for g in groups for _ in range(g)]


def check_templates(templates: list[str]) -> None:
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise FactEditError("every context template must contain exactly one '{}'")


@torch.no_grad()
def generate_context_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    length_params: list[tuple[int, int]],
    *,
    seed: int = 0,
    top_k: int = 5,
    starts: list[str] | None = None,
) -> list[str]:
    """``["{}"]`` plus, for each (length, n), n sampled texts of ``length`` tokens (prompt included).

    Without ``starts`` (ROME) sampling begins at the document-start token, which is dropped
    from the text; with ``starts`` (MEMIT: "The", "Therefore", ...) each start word gets
    ``n // len(starts)`` samples and stays part of the text.
    """
    device = input_device(model)
    prompts = [(_start_ids(tok), False)] if not starts else [(tok(s)["input_ids"], True) for s in starts]
    templates = ["{}"]
    with torch.random.fork_rng(devices=[d for d in model_devices(model) if d.type == "cuda"]):
        torch.manual_seed(seed)
        for length, n_gen in length_params:
            per_prompt = _per_start(n_gen, starts)
            for ids, keep_prompt in prompts:
                start = torch.tensor([ids], device=device)
                new_tokens = max(1, length - start.shape[1])
                out = model.generate(
                    start.repeat(per_prompt, 1),
                    attention_mask=torch.ones_like(start).repeat(per_prompt, 1),
                    do_sample=True,
                    top_k=top_k,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
                for row in out if keep_prompt else out[:, start.shape[1] :]:
                    text = tok.decode(row, skip_special_tokens=True)
                    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
                    templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def context_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    length_params: list[tuple[int, int]],
    *,
    seed: int = 0,
    starts: list[str] | None = None,
    cache_folder: Path | None = None,
    fingerprint: str | None = None,
    progress: Progress | bool | None = None,
) -> list[str]:
    """Seeded templates, read from the on-disk cache when this model already made them."""
    fingerprint = fingerprint or model_fingerprint(model)
    fields = {"fp": fingerprint, "len": [list(p) for p in length_params], "seed": seed, "starts": starts}
    if start := document_start_of(tok):  # sampling starts differ; files from before the field keep their names
        fields["document_start"] = start
    key = json.dumps(fields, sort_keys=True)
    path = (cache_folder or cache_dir("templates")) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return read_template_cache(path)
    with as_progress(progress).stage("context templates (generated once, then cached)", total=None) as stage:
        templates = generate_context_templates(model, tok, length_params, seed=seed, starts=starts)
        stage.advance(len(templates))
    atomic_write_bytes(path, dumps_signed_json(templates, CACHE_FORMAT))
    return templates


def read_template_cache(path: Path) -> list[str]:
    """The templates of one cache file, verified against its checksum (refused, naming the file, if damaged)."""
    label = f"context-template cache {path}"
    remedy = "delete it to generate the templates again"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}") from exc
    data = loads_signed_json(raw, CACHE_FORMAT, label, remedy=remedy)
    if not isinstance(data, list) or not data or any(not isinstance(t, str) or t.count("{}") != 1 for t in data):
        raise FactEditError(f"{label} does not hold context templates; {remedy}")
    return data
