"""The web app's applied patches saved on disk, so that a crash or a restart does not lose them.

One folder per model name (``$FACTEDIT_HOME/web/<model>/`` by default): each applied patch as a
factedit patch file, and ``stack.json`` listing them in application order with the SHA-256 of
each file and the model fingerprint after it was applied. The manifest is the truth: a file is
written (to a temporary name, then renamed) before the manifest names it, and the manifest is
replaced atomically, so a crash at any point leaves either the old or the new stack on disk,
never half of one. On start the saved stack is re-applied in order, each file checked against
its hash and each step against the fingerprint it had; the first patch that does not verify
stops the restore, and it and everything after it are moved to a ``rejected-<time>`` folder
(kept for inspection, never deleted) and reported on the page.

A folder is used by one server at a time (an exclusive ``flock`` on ``.lock``): a second server
for the same model and home keeps its patches in memory only and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "stack.json"
FORMAT = 1


class StoreInUse(Exception):  # noqa: N818
    """Another process holds the folder's lock."""


def model_folder(root: Path, model_name: str) -> Path:
    """``root/<model>``, with the name made safe as one path component (registry names already are)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return root / (safe[:60] if safe == model_name else f"{safe[:50]}-{digest}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a per-process temporary name, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PatchStore:
    """The saved stack of one model: ``entries()`` in order, ``add``, ``remove_last``, ``reject``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(folder / ".lock", "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise StoreInUse(f"{folder} is used by another factedit server") from None
        self._manifest = self._read()

    def close(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()

    # -- reading ----------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        empty = {"format": FORMAT, "base_fingerprint": None, "patches": []}
        if not path.is_file():
            return empty
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("patches"), list):
                raise ValueError("not a factedit web stack manifest")
            for entry in data["patches"]:
                if not isinstance(entry, dict) or not all(
                    isinstance(entry.get(k), str) for k in ("id", "file", "sha256", "fingerprint", "source")
                ):
                    raise ValueError("an entry lacks id, file, sha256, fingerprint or source")
                if Path(entry["file"]).name != entry["file"]:
                    raise ValueError(f"entry file {entry['file']!r} is not a plain file name")
            return data
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # the patch files go aside with it
            moved = self._move_aside([path, *sorted(self.folder.glob("*.safetensors"))], f"unreadable manifest: {exc}")
            log.warning("the saved web patch stack in %s was unreadable (%s); moved to %s", self.folder, exc, moved)
            return empty

    @property
    def base_fingerprint(self) -> str | None:
        return self._manifest.get("base_fingerprint")

    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._manifest["patches"]]

    def read(self, entry: dict[str, Any]) -> bytes:
        """The bytes of a saved patch, refused (``ValueError``) if they are not the bytes that were saved."""
        data = (self.folder / entry["file"]).read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise ValueError(f"{entry['file']} does not match its recorded SHA-256 (changed or damaged on disk)")
        return data

    # -- writing ----------------------------------------------------------------------
    def _save_manifest(self) -> None:
        raw = json.dumps(self._manifest, indent=1, sort_keys=True).encode()
        _write_atomic(self.folder / MANIFEST, raw)

    def settle(self, base_fingerprint: str) -> None:
        """After a restore: record the unedited weights the saved patches apply to (only when none are
        saved for other ones) and remove files no entry names (left by a crash before a manifest write)."""
        if self._manifest.get("base_fingerprint") != base_fingerprint:
            if self._manifest["patches"]:
                raise ValueError("the saved patches were made for other weights; move them aside first")
            self._manifest["base_fingerprint"] = base_fingerprint
            self._save_manifest()
        self._drop_unlisted()

    def add(self, patch_id: str, source: str, created: float, data: bytes, fingerprint: str) -> None:
        """Save one applied patch (file first, then the manifest that names it)."""
        name = f"{len(self._manifest['patches']):03d}-{patch_id}.safetensors"
        _write_atomic(self.folder / name, data)
        entry = {
            "id": patch_id,
            "file": name,
            "sha256": sha256_bytes(data),
            "fingerprint": fingerprint,
            "source": source,
            "created": created,
        }
        self._manifest["patches"].append(entry)
        try:
            self._save_manifest()
        except BaseException:
            self._manifest["patches"].pop()
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()
            raise

    def remove_last(self, patch_id: str) -> None:
        """Forget the newest saved patch (it was reverted): manifest first, then the file."""
        patches = self._manifest["patches"]
        if not patches or patches[-1]["id"] != patch_id:
            return
        entry = patches.pop()
        try:
            self._save_manifest()
        except BaseException:
            patches.append(entry)
            raise
        with contextlib.suppress(OSError):
            (self.folder / entry["file"]).unlink()

    def keep_first(self, n: int, reason: str) -> Path | None:
        """Keep the first ``n`` saved patches; move the others' files aside (see :meth:`_move_aside`)."""
        rest = self._manifest["patches"][n:]
        if not rest:
            return None
        moved = self._move_aside([self.folder / e["file"] for e in rest], reason, rest)
        self._manifest["patches"] = self._manifest["patches"][:n]
        self._save_manifest()
        return moved

    def _move_aside(self, paths: list[Path], reason: str, entries: list[dict[str, Any]] | None = None) -> Path:
        """Move files into ``rejected-<time>/`` with a note saying why: kept for inspection, never deleted."""
        target = self.folder / f"rejected-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, target / path.name)
        note = {"reason": reason, "entries": entries or []}
        (target / "reason.json").write_text(json.dumps(note, indent=1), encoding="utf-8")
        return target

    def _drop_unlisted(self) -> None:
        """Remove patch files no manifest entry names (left by a crash between file and manifest)."""
        listed = {e["file"] for e in self._manifest["patches"]}
        for path in self.folder.glob("*.safetensors"):
            if path.name not in listed:
                with contextlib.suppress(OSError):
                    path.unlink()
        for path in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()
