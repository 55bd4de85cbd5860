"""The one reader of a safetensors file's JSON header (tensor table and ``__metadata__``).

A safetensors file starts with an 8-byte little-endian length, then that many bytes of
JSON: one object with an entry per tensor and an optional ``"__metadata__"`` object of
string to string. factedit keeps its own metadata there (patch fields, statistics keys,
replaced-weight hashes), so several modules need the header without the tensors; they all
read it here, with the same checks, instead of slicing bytes by hand. Files are untrusted
input: a bad length, a header that is not a JSON object or metadata that is not strings
is a one-line :class:`FactEditError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError

_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def _parse(header: bytes, source: str) -> dict[str, Any]:
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FactEditError(f"{source} is not a safetensors file (corrupt or truncated header: {exc})") from exc
    if not isinstance(parsed, dict):
        raise FactEditError(f"{source} is not a safetensors file (its header is not a JSON object)")
    meta = parsed.get("__metadata__")
    if meta is None:  # absent or null: no metadata
        parsed["__metadata__"] = meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FactEditError(f"{source}: safetensors metadata must map strings to strings")
    return parsed


def _header_length(prefix: bytes, total: int | None, source: str) -> int:
    if len(prefix) < _LENGTH_BYTES:
        raise FactEditError(f"{source} is not a safetensors file (corrupt or truncated: {len(prefix)} bytes)")
    length = int.from_bytes(prefix[:_LENGTH_BYTES], "little")
    if length > MAX_HEADER_BYTES or (total is not None and _LENGTH_BYTES + length > total):
        raise FactEditError(f"{source} is not a safetensors file (corrupt or truncated: header of {length} bytes)")
    return length


def read_header(source: bytes | str | Path, name: str | None = None) -> dict[str, Any]:
    """The whole JSON header of a safetensors file (or its bytes); ``"__metadata__"`` is always a dict.

    From a path only the header is read, not the tensors. ``name`` is how errors refer to the source.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        label = name or "<bytes>"
        length = _header_length(bytes(view[:_LENGTH_BYTES]), len(view), label)
        return _parse(bytes(view[_LENGTH_BYTES : _LENGTH_BYTES + length]), label)
    path = Path(source)
    label = name or str(path)
    try:
        with open(path, "rb") as fh:
            length = _header_length(fh.read(_LENGTH_BYTES), path.stat().st_size, label)
            header = fh.read(length)
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}") from exc
    return _parse(header, label)


def read_metadata(source: bytes | str | Path, name: str | None = None) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none)."""
    return read_header(source, name)["__metadata__"]


def read_json_metadata(source: bytes | str | Path, key: str, name: str | None = None) -> Any:
    """One metadata value that holds JSON (factedit stores structured metadata as JSON strings)."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    meta = read_metadata(source, label)
    if key not in meta:
        raise FactEditError(f"{label} has no {key!r} metadata (not written by factedit)")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise FactEditError(f"{label}: metadata {key!r} is not valid JSON ({exc})") from exc
