"""The known-facts data set of causal tracing (ROME's ``known_1000.json``) and which facts a model knows.

The file lists facts GPT-2 XL predicts; another model knows other facts, so
:func:`known_by_model` re-checks each prompt: a fact is kept when the model's top
next token is the first token of ``" " + attribute``.

A downloaded copy is kept under ``$FACTEDIT_HOME/data`` with a ``.sha256`` sidecar, verified on
every read (a damaged copy is refused, naming it; delete it to download it again).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.hooks import Trace
from factedit.integrity import read_with_sidecar, write_with_sidecar
from factedit.models.architectures import ArchSpec, arch_for
from factedit.models.placement import input_device
from factedit.models.runtime import lm_logits
from factedit.paths import cache_dir, data_dir
from factedit.progress import Progress, as_progress
from factedit.text import pad_id, pad_right
from factedit.tracing.inputs import answer_token

log = logging.getLogger(__name__)

KNOWN_FILE = "known_1000.json"
KNOWN_URL = "https://rome.baulab.info/data/dsets/known_1000.json"


@dataclass(frozen=True)
class KnownFact:
    """One record of ``known_1000.json``; ``prompt`` is the full prompt (the subject filled in)."""

    known_id: int
    subject: str
    attribute: str
    prompt: str
    template: str = ""
    prediction: str = ""
    relation_id: str = ""


def known_facts_path(path: str | Path | None = None, *, download: bool = True) -> Path:
    """Where ``known_1000.json`` is: the given path, the data folder, the cache, else downloaded there."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FactEditError(f"known-facts file not found: {p}")
        return p
    folder = data_dir()
    if folder is not None and (folder / KNOWN_FILE).is_file():
        return folder / KNOWN_FILE
    cached = cache_dir("data") / KNOWN_FILE
    if cached.is_file():
        return cached
    if not download:
        raise FactEditError(f"{KNOWN_FILE} not found: set FACTEDIT_DATA_DIR to a folder holding it or pass its path")
    log.info("downloading %s to %s", KNOWN_URL, cached)
    try:
        with urllib.request.urlopen(KNOWN_URL, timeout=60) as resp:  # noqa: S310 (fixed https URL)
            data = resp.read()
        json.loads(data)
    except (OSError, ValueError) as exc:
        raise FactEditError(
            f"{KNOWN_FILE} not found locally and downloading {KNOWN_URL} failed ({exc}); "
            "set FACTEDIT_DATA_DIR or pass the file's path"
        ) from exc
    write_with_sidecar(cached, data)
    return cached


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """Read and check the known facts (each subject must occur in its prompt)."""
    p = known_facts_path(path)
    cached = path is None and p == cache_dir("data") / KNOWN_FILE
    try:
        raw = read_with_sidecar(p, f"downloaded known facts {p}") if cached else p.read_bytes()
        records = json.loads(raw)
    except FactEditError:
        raise
    except (OSError, ValueError) as exc:
        raise FactEditError(f"cannot read known facts from {p}: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise FactEditError(f"{p} holds no list of facts")
    facts = []
    for i, r in enumerate(records):
        try:
            fact = KnownFact(
                known_id=int(r.get("known_id", i)),
                subject=r["subject"],
                attribute=r["attribute"],
                prompt=r["prompt"],
                template=r.get("template", ""),
                prediction=r.get("prediction", ""),
                relation_id=r.get("relation_id", ""),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise FactEditError(f"{p}: record {i} lacks subject/attribute/prompt ({exc})") from exc
        if fact.subject not in fact.prompt:
            log.debug("skipping known fact %d: subject not in prompt", fact.known_id)
            continue
        facts.append(fact)
    return facts


@dataclass(frozen=True)
class KnownPrediction:
    """A fact with the model's top next token, its probability, and whether it starts the attribute."""

    known_id: int
    predicted: str
    predicted_id: int
    prob: float
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def known_by_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    facts: Sequence[KnownFact],
    *,
    batch_size: int = 64,
    progress: Progress | bool | None = None,
) -> list[KnownPrediction]:
    """The model's first predicted token for every fact (batched; the LM head runs at the last token only).

    ``progress`` gets one stage, "known facts", counted in facts.
    """
    arch = arch_for(model)
    device = input_device(model)
    pad = pad_id(tok)
    out: list[KnownPrediction] = []
    with as_progress(progress).stage("known facts", total=len(facts), unit="fact") as stage:
        for start in range(0, len(facts), batch_size):
            chunk = facts[start : start + batch_size]
            out += _predict_chunk(model, tok, arch, chunk, device, pad)
            stage.advance(len(chunk))
    return out


def _predict_chunk(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    arch: ArchSpec,
    chunk: Sequence[KnownFact],
    device: torch.device,
    pad: int,
) -> list[KnownPrediction]:
    """Top next token of each fact of one batch, and whether it is the attribute's first token."""
    seqs = [tok(f.prompt)["input_ids"] for f in chunk]
    ids, mask = pad_right(seqs, pad, device)
    with Trace(model, arch.final_norm, stop=True) as fin:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    last = (mask.sum(1) - 1).to(fin.output.device)
    rows = torch.arange(len(chunk), device=fin.output.device)
    probs = torch.softmax(lm_logits(model, arch, fin.output[rows, last]).float(), -1)
    top_p, top = probs.max(-1)
    out = []
    for f, p, i in zip(chunk, top_p.tolist(), top.tolist(), strict=True):
        try:
            expected = answer_token(tok, f.prompt, f.attribute)
        except FactEditError:
            expected = -1  # an attribute that tokenizes to nothing is never predicted
        out.append(KnownPrediction(f.known_id, tok.decode([i]), int(i), float(p), int(i) == expected))
    return out
