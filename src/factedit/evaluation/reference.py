"""Reference texts and IDF for ROME's consistency metric (Reference Score), from a local corpus.

ROME compares generated text with Wikipedia snippets about *other subjects that share the
relation and the new target* (``attribute_snippets.json``), under TF-IDF weights fitted on
those snippets (``idf.npy``, ``tfidf_vocab.json``). Those files are not available here, so
(a documented deviation) the reference texts for a target are the corpus lines that mention
it (whole-word, case-sensitive; the first ``max_texts`` in corpus order), and the IDF is fitted
on every line of the same corpus. Default corpus: ``corpus/wiki_vital_extracts_en.txt``
(English Wikipedia lead sections of the Level-4 vital articles) in the data folder. Looser than
ROME's: a line mentioning "Sweden" is not necessarily about the same relation.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from pathlib import Path

from factedit.evaluation.metrics import TfidfModel
from factedit.stats.corpus import open_corpus

log = logging.getLogger(__name__)

REFERENCE_NOTE = (
    "Reference Score deviates from ROME: ROME's attribute_snippets/idf/tfidf_vocab files are not available; "
    "reference texts are lines of the local Wikipedia corpus that mention target_new (up to {max_texts}, "
    "corpus order), and IDF is fitted on that corpus ({corpus})."
)


class ReferenceTexts:
    """Reference texts per target and the TF-IDF model, built once per run."""

    def __init__(self, corpus: str | Path | None = None, *, max_texts: int = 50) -> None:
        c = open_corpus(corpus)
        self.corpus_name = c.name
        self.corpus_id = c.corpus_id
        self.max_texts = max_texts
        self.documents = [d.strip() for d in c.documents if d.strip()]
        log.info("fitting IDF on %d documents of %s", len(self.documents), c.name)
        self.tfidf = TfidfModel.fit(self.documents)
        self._cache: dict[str, list[str]] = {}

    def describe(self) -> dict:
        return {
            "corpus": self.corpus_name,
            "corpus_id": self.corpus_id,
            "max_texts": self.max_texts,
            "n_documents": len(self.documents),
            "note": self.note(),
        }

    def note(self) -> str:
        return REFERENCE_NOTE.format(max_texts=self.max_texts, corpus=self.corpus_name)

    def for_target(self, target: str) -> list[str]:
        """Corpus lines mentioning ``target`` as a whole word (cached per target)."""
        target = target.strip()
        if target not in self._cache:
            pattern = re.compile(r"(?<!\w)" + re.escape(target) + r"(?!\w)")
            found = []
            for doc in self.documents:
                if pattern.search(doc):
                    found.append(doc)
                    if len(found) >= self.max_texts:
                        break
            self._cache[target] = found
        return self._cache[target]

    def score(self, generated: list[str], target: str) -> float | None:
        """TF-IDF cosine of all generated texts joined vs all reference texts joined; None without references."""
        refs = self.for_target(target)
        if not refs:
            return None
        return self.tfidf.similarity(" ".join(generated), " ".join(refs))


@lru_cache(maxsize=4)
def reference_texts(corpus: str | None = None, max_texts: int = 50) -> ReferenceTexts:
    """A shared :class:`ReferenceTexts` per (corpus, max_texts) in this process."""
    return ReferenceTexts(corpus, max_texts=max_texts)


def texts_digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
