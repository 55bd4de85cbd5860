"""Content checksums of every file factedit writes and later reads back, in one place.

A cache or patch file that changed on disk (a bad sector, a half-finished copy, a hand edit, a
bit flipped in transit) must be refused, not used: an edit computed from damaged statistics or a
patch with one damaged factor looks like a perfectly valid result. So every file factedit writes
carries a SHA-256 of its content, and every read verifies it first:

- safetensors files (patches, second moments, replaced weights, MEMIT z vectors): the digest of
  the tensors (names, dtypes, shapes, bytes) *and* of the ``__metadata__`` strings is stored in
  the metadata itself, under :data:`CHECKSUM_KEY` (:func:`save_signed`, :func:`verify_signed`);
- JSON caches (context templates): a small envelope ``{"format", "sha256", "data"}``
  (:func:`dumps_signed_json`, :func:`loads_signed_json`);
- folders (the converted-model cache): a manifest of per-file sizes and digests, written after
  every other file (:func:`write_manifest`, :func:`verify_manifest`). Verifying a 540 MB model on
  every load would cost a third of a second, so a successful verification is remembered per file
  by ``(inode, size, mtime_ns, ctime_ns)``: any normal write to a file changes its ctime, so a
  rewritten or damaged file is hashed again;
- downloaded files kept in the cache (known facts): a ``<file>.sha256`` sidecar
  (:func:`write_with_sidecar`, :func:`read_with_sidecar`).

A mismatch is a one-line :class:`FactEditError` naming the file and saying how to recover
(delete it, it is recomputed). Checksums defend against damage, not against someone who rewrites
a file on purpose (they can recompute the digest); what a patch may change is checked separately
against the model it is applied to. :func:`tensor_chunks` is also the byte stream behind the
weights' fingerprint (``models/fingerprint.py``), so there is one definition of "a tensor's bytes".
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from factedit.errors import FactEditError
from factedit.paths import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKSUM_KEY = "factedit_sha256"
MANIFEST_FILE = "factedit-manifest.json"
MANIFEST_FORMAT = "factedit-manifest-v1"
VERIFIED_FILE = "factedit-verified.json"  # stat keys of verified files (hidden names are for temporaries)
SIDECAR_SUFFIX = ".sha256"
CHUNK_BYTES = 64 << 20  # large tensors are hashed (and copied off a GPU) this much at a time


# -- tensor bytes ---------------------------------------------------------------------------------------------


def tensor_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The bytes of ``tensor`` in row-major order, as zero-copy views where possible.

    A contiguous CPU tensor is read in place; a GPU tensor is copied to the host ``chunk_bytes`` at a
    time and a non-contiguous one is made contiguous a slice of rows at a time, so no whole copy of a
    large tensor is ever held. Meta tensors have no bytes.
    """
    t = tensor.detach()
    if t.device.type == "meta" or t.numel() == 0:
        return
    if not t.is_contiguous():
        rows = max(1, chunk_bytes // max(1, t[0].numel() * t.element_size())) if t.ndim else 1
        if t.ndim == 0:
            yield from tensor_chunks(t.contiguous(), chunk_bytes)
            return
        for start in range(0, t.shape[0], rows):
            yield from tensor_chunks(t[start : start + rows].contiguous(), chunk_bytes)
        return
    flat = t.reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        view = memoryview(flat.numpy())
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]
        return
    for start in range(0, flat.numel(), chunk_bytes):
        yield memoryview(flat[start : start + chunk_bytes].cpu().numpy())


def tensor_bytes_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of one tensor's bytes (row-major), streamed and never cached: the digest of
    ``tensor.numpy().tobytes()``. ``models.fingerprint.tensor_sha256`` is the same digest, remembered per weight."""
    h = hashlib.sha256()
    for chunk in tensor_chunks(tensor):
        h.update(chunk)
    return h.hexdigest()


# -- safetensors files ------------------------------------------------------------------------------------------


def digest_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes; in name order) and every metadata string
    except the checksum itself: what :data:`CHECKSUM_KEY` holds."""
    h = hashlib.sha256(b"factedit-tensors-v1\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        for chunk in tensor_chunks(t):
            h.update(chunk)
    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    h.update(json.dumps(sorted(meta.items())).encode())
    return h.hexdigest()


def sign(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """``metadata`` plus its checksum entry (what a file should be written with)."""
    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    meta[CHECKSUM_KEY] = digest_tensors(tensors, meta)
    return meta


def save_signed(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with the checksum in its metadata (tensors moved to the CPU, contiguous)."""
    from safetensors.torch import save

    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return save(cpu, metadata=sign(cpu, metadata))


def verify_signed(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    label: str,
    *,
    required: bool = True,
    remedy: str = "delete it to recompute it",
) -> bool:
    """Check the stored checksum against the content; True if one was there and matched.

    A file without a checksum is refused when ``required`` (factedit writes one into every file of
    this kind) and accepted (False) otherwise, for files that predate checksums or come from elsewhere.
    """
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        if required:
            raise FactEditError(f"{label} has no content checksum, so it cannot be trusted; {remedy}")
        return False
    if stored != digest_tensors(tensors, metadata):
        raise FactEditError(f"{label} is corrupt (its content does not match its checksum); {remedy}")
    return True


def load_signed(
    source: bytes | str | Path, label: str, *, required: bool = True, remedy: str = "delete it to recompute it"
) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """Read a safetensors file (path or bytes) and verify its checksum: ``(tensors, metadata, verified)``.

    Unreadable, truncated or malformed files are refused the same way as a checksum mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from factedit.safetensors_meta import read_metadata

    try:
        data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}") from exc
    try:
        metadata = read_metadata(data, label)
        tensors = load(bytes(data))
    except FactEditError as exc:
        raise FactEditError(f"{exc}; {remedy}") from exc
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise FactEditError(f"{label} is corrupt or truncated ({first_line(exc)}); {remedy}") from exc
    verified = verify_signed(tensors, metadata, label, required=required, remedy=remedy)
    return tensors, metadata, verified


# -- JSON files -------------------------------------------------------------------------------------------------


def _json_digest(fmt: str, data: Any) -> str:
    return hashlib.sha256(json.dumps([fmt, data], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def dumps_signed_json(data: Any, fmt: str) -> bytes:
    """``data`` in an envelope that carries its format and checksum."""
    envelope = {"format": fmt, "sha256": _json_digest(fmt, data), "data": data}
    return json.dumps(envelope, indent=1, ensure_ascii=False).encode()


def loads_signed_json(raw: bytes, fmt: str, label: str, *, remedy: str = "delete it to recompute it") -> Any:
    """The ``data`` of an envelope written by :func:`dumps_signed_json`, refusing anything else."""
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FactEditError(f"{label} is corrupt (not valid JSON: {exc}); {remedy}") from exc
    if not isinstance(envelope, dict) or envelope.get("format") != fmt or "data" not in envelope:
        raise FactEditError(f"{label} is not a {fmt} file (an older or damaged cache); {remedy}")
    if envelope.get("sha256") != _json_digest(fmt, envelope["data"]):
        raise FactEditError(f"{label} is corrupt (its content does not match its checksum); {remedy}")
    return envelope["data"]


# -- plain files ------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: Path, digest: str) -> None:
    """Record ``digest`` as the SHA-256 of ``path`` in ``path.sha256`` (``sha256sum`` format), atomically.
    Written *before* the file itself is renamed into place: a crash in between leaves a sidecar that does
    not match, never a file nobody can verify."""
    atomic_write_bytes(sidecar_of(path), f"{digest}  {path.name}\n".encode())


def _sidecar_digest(path: Path, remedy: str) -> str | None:
    sidecar = sidecar_of(path)
    try:
        return sidecar.read_text().split()[0] if sidecar.is_file() else None
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise FactEditError(f"{sidecar} is unreadable ({exc}); {remedy}") from exc


def matches_sidecar(path: Path) -> bool:
    """True if ``path`` and its sidecar exist and agree (large files: streamed)."""
    try:
        expected = _sidecar_digest(path, "")
        return expected is not None and path.is_file() and file_sha256(path) == expected
    except (FactEditError, OSError):
        return False


def write_with_sidecar(path: Path, data: bytes) -> None:
    """Write ``path`` and ``path.sha256`` atomically (the sidecar first, see :func:`write_sidecar`)."""
    write_sidecar(path, hashlib.sha256(data).hexdigest())
    atomic_write_bytes(path, data)


def read_with_sidecar(path: Path, label: str, *, remedy: str = "delete it to download it again") -> bytes:
    """The bytes of a file written by :func:`write_with_sidecar`, verified; a file without a sidecar
    (written before checksums) is read with a warning."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}") from exc
    sidecar = sidecar_of(path)
    expected = _sidecar_digest(path, remedy)
    if expected is None:
        log.warning("%s has no checksum (written by an older factedit); using it unverified", label)
        return data
    if hashlib.sha256(data).hexdigest() != expected:
        raise FactEditError(f"{label} is corrupt (its content does not match {sidecar.name}); {remedy}")
    return data


# -- folders ----------------------------------------------------------------------------------------------------

_verified_lock = threading.Lock()
_verified: dict[tuple[str, str], tuple[int, int, int, int, str]] = {}  # (folder, file) -> stat key + digest


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _folder_files(folder: Path, skip: Iterable[str]) -> list[str]:
    skipped = {MANIFEST_FILE, VERIFIED_FILE, *skip}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in skipped)


def write_manifest(folder: Path, *, skip: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` (except ``skip``) into ``folder/factedit-manifest.json``; call it
    after every other file is written and before the folder is marked complete. ``extra``: more
    JSON fields to keep (and checksum) in the manifest."""
    files = {}
    for rel in _folder_files(folder, skip):
        path = folder / rel
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {**(extra or {}), "files": files}
    atomic_write_bytes(folder / MANIFEST_FILE, dumps_signed_json(manifest, MANIFEST_FORMAT))
    return manifest


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file()


def verify_manifest(folder: Path, label: str, *, remedy: str | None = None) -> dict[str, Any]:
    """Check every file listed in ``folder``'s manifest (size, then digest unless already verified
    with the same inode, size, mtime and ctime). Refuses, naming the first bad file; returns the manifest."""
    remedy = remedy or f"delete the folder {folder} and load the model again to rebuild it"
    manifest_path = folder / MANIFEST_FILE
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise FactEditError(f"{label}: cannot read {manifest_path} ({exc.strerror or exc}); {remedy}") from exc
    manifest = loads_signed_json(raw, MANIFEST_FORMAT, f"{label}: {manifest_path}", remedy=remedy)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise FactEditError(f"{label}: {manifest_path} lists no files; {remedy}")
    remembered = _read_verified(folder)
    newly: dict[str, list] = {}
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if not isinstance(entry, dict) or not path.is_file():
            raise FactEditError(f"{label}: {path} is missing; {remedy}")
        key = _stat_key(path)
        if key[1] != entry.get("size"):
            raise FactEditError(
                f"{label}: {path} is corrupt or truncated ({key[1]} bytes, {entry.get('size')} expected); {remedy}"
            )
        known = (*key, entry.get("sha256"))
        with _verified_lock:
            if _verified.get((str(folder), rel)) == known:
                continue
        if tuple(remembered.get(rel, ())) == known:
            with _verified_lock:
                _verified[(str(folder), rel)] = known
            continue
        if file_sha256(path) != entry.get("sha256"):
            raise FactEditError(f"{label}: {path} is corrupt (its content does not match the manifest); {remedy}")
        if _stat_key(path) != key:  # changed while we read it: do not remember a check of moving content
            raise FactEditError(f"{label}: {path} changed while it was being verified; load it again")
        with _verified_lock:
            _verified[(str(folder), rel)] = known
        newly[rel] = list(known)
    if newly:
        _write_verified(folder, {**{k: v for k, v in remembered.items() if k in files}, **newly})
    return manifest


def _read_verified(folder: Path) -> dict[str, list]:
    """Stat keys remembered on disk by an earlier process (an unreadable record is just ignored: it only saves time)."""
    try:
        data = json.loads((folder / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_verified(folder: Path, record: dict[str, list]) -> None:
    try:
        atomic_write_bytes(folder / VERIFIED_FILE, json.dumps(record, sort_keys=True).encode())
    except OSError as exc:  # a read-only cache still loads, it is only verified again next time
        log.debug("could not remember the verification of %s: %s", folder, exc)


def forget_verified(folder: Path) -> None:
    """Drop this process's memory of verified files under ``folder`` (tests, or after a rebuild)."""
    with _verified_lock:
        for key in [k for k in _verified if k[0] == str(folder)]:
            del _verified[key]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


__all__ = [
    "CHECKSUM_KEY",
    "MANIFEST_FILE",
    "digest_tensors",
    "dumps_signed_json",
    "file_sha256",
    "first_line",
    "forget_verified",
    "has_manifest",
    "load_signed",
    "loads_signed_json",
    "matches_sidecar",
    "read_with_sidecar",
    "save_signed",
    "sign",
    "tensor_chunks",
    "tensor_bytes_sha256",
    "verify_manifest",
    "verify_signed",
    "write_manifest",
    "write_sidecar",
    "write_with_sidecar",
]
