"""First use of every registered model, from an empty ``$FACTEDIT_HOME``, on tiny GGUF stand-ins.

The real weight packages are hundreds of MB (CI installs only the default one), but the loading path
does not care what the chunks hold: it finds the packages without importing them, joins their chunks
in package order, dequantizes with ``transformers`` and caches float32 safetensors. So each test lays
out fake packages exactly where and how a registry entry says (its ``modules`` and ``files``), fills
them with a tiny GGUF of the entry's family split into one chunk per package, puts them first on
``sys.path`` and calls the real ``load_model``. Parametrized over ``REGISTRY``: a new entry is covered
without touching this file.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

from factedit.errors import FactEditError
from factedit.models import arch_for, load_model
from factedit.models.registry import CACHE_MARKER, REGISTRY, ModelSource, package_dir

from .gguf_files import SAMPLE_TEXT, chat_template, reference_model, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = sorted(REGISTRY)
CHUNKED = [name for name in NAMES if len(REGISTRY[name].modules) > 1]


def family_of(name: str) -> str:
    """The GGUF family of a registry entry, from its name (``test_family_matches_installed_weights``
    checks this against the real package where it is installed). Unknown names are taken as Llama,
    the architecture llama.cpp also writes for Mistral-style models."""
    for prefix, family in (("gemma3", "gemma3"), ("qwen2", "qwen2")):
        if name.startswith(prefix):
            return family
    return "llama"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """An empty home that does not exist yet: nothing here may read or write the real one."""
    path = tmp_path / "home"
    monkeypatch.setenv("FACTEDIT_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family) -> (bytes of a tiny GGUF file, the state dict it must load as)``, written once per family."""
    made: dict[str, tuple[bytes, dict[str, torch.Tensor]]] = {}

    def get(family: str) -> tuple[bytes, dict[str, torch.Tensor]]:
        if family not in made:
            path = tmp_path_factory.mktemp("gguf") / f"{family}.gguf"
            expected = write_tiny_gguf(path, family)
            made[family] = (path.read_bytes(), expected)
        return made[family]

    return get


# -- fake installed packages ------------------------------------------------------------------------


def chunk_names(source: ModelSource, *, padded: bool = True) -> list[str]:
    """One file name per package, matching the entry's first glob pattern: ``part01`` ... like the real
    packages, or ``part1``, ``part2``, ... ``part10`` (``padded=False``), whose string order is not their
    numeric order once there are ten or more."""
    pattern = source.files[0]
    if "*" not in pattern:
        assert len(source.modules) == 1, f"{source.name}: a plain file name can only hold one chunk"
        return [pattern]
    return [pattern.replace("*", f"{k:02d}" if padded else str(k), 1) for k in range(1, len(source.modules) + 1)]


def install(site: Path, source: ModelSource, data: bytes, *, padded: bool = True) -> list[Path]:
    """Lay out ``source``'s packages under ``site``, one chunk of ``data`` each, in package order.
    Returns the chunk files in that order."""
    names = chunk_names(source, padded=padded)
    cuts = [len(data) * i // len(names) for i in range(len(names) + 1)]
    chunks = []
    for k, (module, name) in enumerate(zip(source.modules, names)):
        folder = site / module
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        chunk = folder / name
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(data[cuts[k] : cuts[k + 1]])
        chunks.append(chunk)
    return chunks


def activate(site: Path, monkeypatch) -> None:
    """Put ``site`` first on ``sys.path``, so the fakes shadow any real package of the same name."""
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


class _Hider:
    """A meta-path finder that makes the named modules look uninstalled to ``package_dir`` (it answers
    with a spec that is no package), also where a real package of that name is installed."""

    def __init__(self, modules) -> None:
        self.modules = set(modules)

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, None) if name in self.modules else None


def hide(monkeypatch, modules) -> None:
    monkeypatch.setattr(sys, "meta_path", [_Hider(modules), *sys.meta_path])
    importlib.invalidate_caches()


# -- checks -----------------------------------------------------------------------------------------


def check_loaded(model, tok, name: str, expected: dict[str, torch.Tensor]) -> None:
    """The right family, exactly the weights the file holds, and a forward pass that gives the logits
    of the model the file was written from."""
    family = family_of(name)
    assert arch_for(model).family == family
    assert model.dtype == torch.float32 and not model.training
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    ids = tok(SAMPLE_TEXT, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0], skip_special_tokens=True) == SAMPLE_TEXT
    reference = reference_model(family)
    reference.load_state_dict(expected)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    if template := chat_template(family):  # the instruct models' template survives the cache
        assert tok.chat_template == template
        chat = [{"role": "user", "content": "the cat"}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")


# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_first_use_from_an_empty_home(name, tiny, home, tmp_path, monkeypatch):
    """The whole path on first use, then a second load served by the cache alone: with every package of
    the entry gone, and without rewriting the cache."""
    source = REGISTRY[name]
    data, expected = tiny(family_of(name))
    site = tmp_path / "site"
    install(site, source, data)
    activate(site, monkeypatch)
    assert [package_dir(m) for m in source.modules] == [site / m for m in source.modules]  # the fakes, first
    assert not home.exists()

    model, tok = load_model(name)
    check_loaded(model, tok, name, expected)
    written = {marker: marker.stat().st_mtime_ns for marker in home.rglob(CACHE_MARKER)}
    assert written, f"no {CACHE_MARKER} under {home}"

    hide(monkeypatch, source.modules)  # uninstalled: only the cache can serve the next load
    assert all(package_dir(m) is None for m in source.modules)
    again, tok2 = load_model(name)
    check_loaded(again, tok2, name, expected)
    assert {marker: marker.stat().st_mtime_ns for marker in home.rglob(CACHE_MARKER)} == written  # read, not redone


@pytest.mark.parametrize("name", CHUNKED)
def test_chunks_join_in_package_order(name, tiny, tmp_path, monkeypatch):
    """Chunks are joined in the registry's package order (part1, part2, ..., part10, ...), not in the
    string order of package or file names, which differs once there are ten or more."""
    source = REGISTRY[name]
    data, expected = tiny(family_of(name))
    site = tmp_path / "site"
    chunks = install(site, source, data, padded=False)
    if len(chunks) >= 10:
        assert sorted(chunks) != chunks and sorted(source.modules) != list(source.modules)  # the test means something
    activate(site, monkeypatch)

    model, tok = load_model(name)
    check_loaded(model, tok, name, expected)


@pytest.mark.parametrize("name", NAMES)
def test_missing_package_is_one_line_error_before_any_work(name, tiny, home, tmp_path, monkeypatch):
    source = REGISTRY[name]
    data, _ = tiny(family_of(name))
    site = tmp_path / "site"
    install(site, source, data)
    activate(site, monkeypatch)
    missing = source.modules[len(source.modules) // 2]
    hide(monkeypatch, [missing])

    with pytest.raises(FactEditError) as caught:
        load_model(name)
    message = str(caught.value)
    assert "\n" not in message
    assert missing in message and source.install_hint() in message
    assert not [p for p in home.rglob("*") if p.is_file()], "files written before the input was checked"


@pytest.mark.parametrize("name", NAMES)
def test_missing_chunk_is_a_clear_error_and_reinstalling_recovers(name, tiny, home, tmp_path, monkeypatch):
    """A package that is installed but lacks its chunk (a broken install) is named in a one-line error,
    nothing half-made stays behind to poison the cache, and once the chunk is back the model loads."""
    source = REGISTRY[name]
    data, expected = tiny(family_of(name))
    site = tmp_path / "site"
    chunks = install(site, source, data)
    activate(site, monkeypatch)
    k = len(chunks) // 2
    kept = tmp_path / "kept-chunk"
    shutil.move(chunks[k], kept)

    with pytest.raises(FactEditError) as caught:
        load_model(name)
    message = str(caught.value)
    assert "\n" not in message
    assert len(source.modules) == 1 or source.modules[k] in message, "which package is broken?"
    assert "pip install" in message, "what to do?"

    shutil.move(kept, chunks[k])
    model, tok = load_model(name)
    check_loaded(model, tok, name, expected)


@pytest.mark.parametrize("name", NAMES)
def test_truncated_chunk_is_a_clear_error_and_reinstalling_recovers(name, tiny, tmp_path, monkeypatch):
    """A chunk cut short (an interrupted install) is a one-line error saying how to reinstall, not a
    traceback from the GGUF reader, and a complete chunk afterwards loads."""
    source = REGISTRY[name]
    data, expected = tiny(family_of(name))
    site = tmp_path / "site"
    chunks = install(site, source, data)
    activate(site, monkeypatch)
    k = len(chunks) // 2
    whole = chunks[k].read_bytes()
    chunks[k].write_bytes(whole[: len(whole) // 2])

    with pytest.raises(FactEditError) as caught:
        load_model(name)
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install" in message, "what to do?"

    chunks[k].write_bytes(whole)
    model, tok = load_model(name)
    check_loaded(model, tok, name, expected)


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file (or its first chunk), read from the header alone: llama.cpp
    writes it as the first key. ``None`` when the file does not start that way."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] != b"GGUF":
        return None
    offset = 4 + 4 + 8 + 8  # magic, version, tensor count, key count
    (key_len,) = struct.unpack_from("<Q", head, offset)
    key = head[offset + 8 : offset + 8 + key_len].decode()
    offset += 8 + key_len
    (value_type,) = struct.unpack_from("<I", head, offset)
    if key != "general.architecture" or value_type != 8:  # 8: string
        return None
    (value_len,) = struct.unpack_from("<Q", head, offset + 4)
    return head[offset + 12 : offset + 12 + value_len].decode()


@pytest.mark.parametrize("name", NAMES)
def test_family_matches_installed_weights(name):
    """Where the real first package is installed, its GGUF header names the family these tests write."""
    source = REGISTRY[name]
    folder = package_dir(source.modules[0])
    if folder is None:
        pytest.skip(f"{source.modules[0]} is not installed")
    first = next((p for pattern in source.files for p in sorted(folder.glob(pattern)) if p.is_file()), None)
    if first is None:
        pytest.skip(f"{source.modules[0]} holds no weight file")
    arch = _gguf_architecture(first)
    if arch is None:
        pytest.skip(f"{first} does not start with general.architecture")
    assert arch == family_of(name)
