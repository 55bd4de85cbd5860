"""Probes of issue 18's integrity part: each parameter id is one kind of damaged file or bad loading
input, and each must be handled cleanly: a one-line :class:`FactEditError` (or, through the CLI,
exit 2 with exactly one line on stderr and no traceback) that names the file where there is one,
with the model's weights and every file on disk left as they were, and nothing created.

Single-bit flips are tried at many positions of every tensor's data and of every header/metadata
byte (patches, statistics, template caches, converted ``model.safetensors``); a flip counts as
handled when it is refused, or, for a few header bytes, when the file still parses to exactly the
same content (nothing damaged is used). Tiny models and tiny files keep the whole list fast; every
cache lives in a temporary ``FACTEDIT_HOME``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from typer.testing import CliRunner

from factedit.cli.main import app
from factedit.editing.hparams import MEMITHyperParams
from factedit.editing.memit import compute_memit
from factedit.editing.patch import (
    METADATA_KEY,
    Patch,
    PatchEntry,
    restore_replaced,
    save_replaced,
)
from factedit.editing.requests import EditRequest
from factedit.editing.templates import CACHE_FORMAT, context_templates, read_template_cache
from factedit.errors import FactEditError
from factedit.integrity import CHECKSUM_KEY, MANIFEST_FILE, VERIFIED_FILE, dumps_signed_json, sign
from factedit.models import arch_for, load_model, model_fingerprint
from factedit.models.devices import resolve_device
from factedit.models.fingerprint import tensor_sha256
from factedit.models.loading import resolve_dtype, store_converted
from factedit.models.registry import REGISTRY, gguf_parts
from factedit.paths import set_data_dir
from factedit.safetensors_meta import read_header, read_metadata
from factedit.stats.second_moment import StatsKey, load_second_moment, save_second_moment, second_moments, stats_path
from factedit.tracing.knowns import KNOWN_FILE, load_known_facts

from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)


# -- helpers ----------------------------------------------------------------------------------------------------------


def refused(fn: Callable[[], object], *names: str) -> FactEditError:
    """``fn()`` raises a one-line FactEditError mentioning each of ``names``."""
    with pytest.raises(FactEditError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return info.value


def flip(data: bytes, byte: int, bit: int) -> bytes:
    out = bytearray(data)
    out[byte] ^= 1 << bit
    return bytes(out)


def header_span(data: bytes) -> tuple[int, int]:
    """(start, end) of a safetensors file's JSON header, the 8-byte length prefix included from 0."""
    return 0, 8 + int.from_bytes(data[:8], "little")


def tensor_spans(data: bytes) -> dict[str, tuple[int, int]]:
    header = read_header(data)
    base = 8 + int.from_bytes(data[:8], "little")
    return {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"
    }


def positions(start: int, end: int, n: int) -> list[int]:
    """``n`` byte positions spread over [start, end), first and last included."""
    if end - start <= n:
        return list(range(start, end))
    return sorted({start + (end - 1 - start) * i // (n - 1) for i in range(n)})


def flips_refused_or_identical(path: Path, data: bytes, where: list[int], load: Callable[[], object], same) -> int:
    """Flip one bit at each position (rotating the bit), write, load: refused, or (header bytes only)
    parsed to identical content. Restores the file. Returns how many were refused."""
    refusals = 0
    for i, byte in enumerate(where):
        path.write_bytes(flip(data, byte, (i * 3) % 8))
        try:
            result = load()
        except FactEditError as exc:
            assert "\n" not in str(exc)
            refusals += 1
        else:
            assert same(result), f"a flip at byte {byte} was accepted with other content"
        assert path.read_bytes() == flip(data, byte, (i * 3) % 8)  # refusing never rewrites the file
    path.write_bytes(data)
    return refusals


def unchanged(model, fingerprint: str) -> None:
    assert model_fingerprint(model, full=True) == fingerprint


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", **SMALL)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("FACTEDIT_HOME", str(path))
    return path


def _patch(model) -> Patch:
    """A dense entry (layer 0) and a low-rank one (layer 1), computed on ``model``."""
    arch = arch_for(model)
    gen = torch.Generator().manual_seed(0)
    entries = []
    for layer, kind in ((0, "dense"), (1, "factors")):
        name = arch.rewrite_weight_at(layer)
        w = model.get_parameter(name)
        parts = (
            {"dense": 1e-3 * torch.randn(w.shape, generator=gen)}
            if kind == "dense"
            else {
                "left": torch.randn(w.shape[0], 2, generator=gen),
                "right": 1e-3 * torch.randn(2, w.shape[1], generator=gen),
            }
        )
        entries.append(PatchEntry(name=name, shape=tuple(w.shape), base_sha256=tensor_sha256(w), **parts))
    return Patch.for_model(
        model,
        method="test",
        entries=entries,
        base_fingerprint=model_fingerprint(model),
        requests=[{"prompt": "{} is in", "subject": "x", "target_new": "y"}],
        hparams={"layers": [0, 1]},
    )


@pytest.fixture()
def patch_file(model, tmp_path):
    path = _patch(model).save(tmp_path / "patch")
    return path, path.read_bytes()


def _same_patch(reference: Patch):
    def same(loaded: Patch) -> bool:
        return loaded.content_digest() == reference.content_digest() and loaded.metadata() == reference.metadata()

    return same


# -- patches ----------------------------------------------------------------------------------------------------------


def _patch_flips(model, patch_file, tensor_key: str, n: int = 24):
    path, data = patch_file
    start, end = tensor_spans(data)[tensor_key]
    fp = model_fingerprint(model)
    count = flips_refused_or_identical(path, data, positions(start, end, n), lambda: Patch.load(path), lambda _: False)
    assert count == len(positions(start, end, n))
    unchanged(model, fp)


def probe_patch_bitflip_factor_left(model, patch_file, **_):
    _patch_flips(model, patch_file, f"{arch_for(model).rewrite_weight_at(1)}.left")


def probe_patch_bitflip_factor_right(model, patch_file, **_):
    _patch_flips(model, patch_file, f"{arch_for(model).rewrite_weight_at(1)}.right")


def probe_patch_bitflip_dense(model, patch_file, **_):
    _patch_flips(model, patch_file, f"{arch_for(model).rewrite_weight_at(0)}.dense")


def probe_patch_bitflip_every_header_byte(model, patch_file, **_):
    path, data = patch_file
    reference = Patch.load(path)
    start, end = header_span(data)
    count = flips_refused_or_identical(
        path, data, list(range(start, end)), lambda: Patch.load(path), _same_patch(reference)
    )
    assert count >= (end - start) * 0.99


def probe_patch_bitflip_checksum_value(model, patch_file, **_):
    path, data = patch_file
    at = data.index(read_metadata(data)[CHECKSUM_KEY].encode()) + 10
    path.write_bytes(flip(data, at, 0))
    refused(lambda: Patch.load(path), str(path), "checksum")


def probe_patch_truncated(model, patch_file, **_):
    path, data = patch_file
    for length in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:length])
        refused(lambda: Patch.load(path), str(path))


def probe_patch_v3_without_checksum(model, patch_file, **_):
    path, data = patch_file
    meta = {k: v for k, v in read_metadata(data).items() if k != CHECKSUM_KEY}
    path.write_bytes(save_bytes(load_bytes(data), metadata=meta))
    refused(lambda: Patch.load(path), str(path), "no content checksum")


def probe_patch_extra_tensor_signed(model, patch_file, **_):
    path, data = patch_file
    tensors = {**load_bytes(data), "extra": torch.zeros(3)}
    path.write_bytes(save_bytes(tensors, metadata=sign(tensors, read_metadata(data))))
    refused(lambda: Patch.load(path), "no entry uses")


def _resigned(data: bytes, **changes) -> bytes:
    meta = json.loads(read_metadata(data)[METADATA_KEY])
    meta.update(changes)
    tensors = load_bytes(data)
    return save_bytes(tensors, metadata=sign(tensors, {METADATA_KEY: json.dumps(meta)}))


def probe_patch_entry_renamed_to_another_layer(model, patch_file, **_):
    """The issue's probe: the layer-0 entry renamed to layer 1's weight (same shape), the file re-signed."""
    path, data = patch_file
    old, new = arch_for(model).rewrite_weight_at(0), arch_for(model).rewrite_weight_at(1)
    meta = json.loads(read_metadata(data)[METADATA_KEY])
    meta["entries"] = [dict(meta["entries"][0], name=new)]
    tensors = {f"{new}.dense": load_bytes(data)[f"{old}.dense"]}
    path.write_bytes(save_bytes(tensors, metadata=sign(tensors, {METADATA_KEY: json.dumps(meta)})))
    patch = Patch.load(path)
    fp = model_fingerprint(model)
    refused(lambda: patch.apply(model), "computed on another weight", new)
    unchanged(model, fp)


def probe_patch_base_sha_altered(model, patch_file, **_):
    path, data = patch_file
    meta = json.loads(read_metadata(data)[METADATA_KEY])
    meta["entries"][1]["base_sha256"] = "0" * 64
    path.write_bytes(_resigned(data, entries=meta["entries"]))
    fp = model_fingerprint(model)
    refused(lambda: Patch.load(path).apply(model), "computed on another weight")
    unchanged(model, fp)


def probe_patch_revert_not_applied(model, patch_file, **_):
    path, _ = patch_file
    fp = model_fingerprint(model)
    patch = Patch.load(path)
    refused(lambda: patch.revert(model), "not applied")
    handle = patch.apply(model)
    handle.revert()
    refused(lambda: handle.revert(), "already reverted")
    refused(lambda: patch.revert(model), "not applied")
    unchanged(model, fp)


def probe_patch_on_an_unsampled_change(model, patch_file, **_):
    """A patch computed on the model is refused once one element of another weight changed (+1000)."""
    path, _ = patch_file
    param = model.get_parameter(arch_for(model).rewrite_weight_at(1).replace("down_proj", "gate_proj"))
    original = param.detach().clone()
    param.data[0, 1] += 1000
    changed = model_fingerprint(model)
    try:
        refused(lambda: Patch.load(path).apply(model), "differ from those this patch was computed on")
        assert model_fingerprint(model) == changed
    finally:
        with torch.no_grad():
            param.copy_(original)


def probe_patch_applied_twice(model, patch_file, **_):
    path, _ = patch_file
    patch = Patch.load(path)
    handle = patch.apply(model)
    try:
        edited = model_fingerprint(model)
        refused(lambda: patch.apply(model), "already applied")
        assert model_fingerprint(model) == edited
    finally:
        handle.revert()


def probe_patch_format_downgrade_keeps_checksum(model, patch_file, **_):
    """'v3' -> 'v2' is a single bit flip; the file still has its checksum, so it is verified and refused."""
    path, data = patch_file
    at = data.index(b"factedit-patch-v3") + len("factedit-patch-v")
    path.write_bytes(flip(data, at, 0))  # '3' -> '2'
    refused(lambda: Patch.load(path), str(path), "checksum")


def probe_replaced_weights_bitflip(model, tmp_path, **_):
    patch = _patch(model)
    handle = patch.apply(model)
    try:
        path = save_replaced(handle, tmp_path / "replaced.safetensors")
    finally:
        handle.revert()
    data = path.read_bytes()
    start, end = tensor_spans(data)[patch.entries[0].name]
    edited = model_fingerprint(model)
    path.write_bytes(flip(data, (start + end) // 2, 6))
    refused(lambda: restore_replaced(model, patch, path), str(path))
    unchanged(model, edited)


# -- statistics -------------------------------------------------------------------------------------------------------


def _stats_file(tmp_path) -> tuple[Path, bytes, StatsKey, torch.Tensor]:
    key = StatsKey("f" * 32, "model.layers.1.mlp.down_proj", "corpus", 100, 32, "float32", None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    moment = x.T @ x / 64
    path = stats_path(key, tmp_path)
    save_second_moment(path, moment, key, 100)
    return path, path.read_bytes(), key, moment


def probe_stats_bitflip_exponent(tmp_path, **_):
    """The issue's probe: flipped exponent bits (float32 bit 30) in the matrix."""
    path, data, key, _ = _stats_file(tmp_path)
    start, end = tensor_spans(data)["mom2"]
    for element in positions(0, (end - start) // 4, 16):
        path.write_bytes(flip(data, start + 4 * element + 3, 6))
        refused(lambda: load_second_moment(path, key), str(path), "delete it to recompute")


def probe_stats_bitflip_mantissa(tmp_path, **_):
    path, data, key, _ = _stats_file(tmp_path)
    start, end = tensor_spans(data)["mom2"]
    for element in positions(0, (end - start) // 4, 16):
        path.write_bytes(flip(data, start + 4 * element, 0))
        refused(lambda: load_second_moment(path, key), str(path))


def probe_stats_bitflip_every_header_byte(tmp_path, **_):
    path, data, key, moment = _stats_file(tmp_path)
    start, end = header_span(data)
    count = flips_refused_or_identical(
        path, data, list(range(start, end)), lambda: load_second_moment(path, key), lambda m: torch.equal(m, moment)
    )
    assert count >= (end - start) * 0.99


def probe_stats_truncated(tmp_path, **_):
    path, data, key, _ = _stats_file(tmp_path)
    for length in (0, 7, 60, len(data) // 2, len(data) - 4):
        path.write_bytes(data[:length])
        refused(lambda: load_second_moment(path, key), str(path))


def probe_stats_cache_without_checksum(tmp_path, **_):
    """A cache file written without a checksum (older factedit, or any other writer) is not trusted."""
    path, data, key, moment = _stats_file(tmp_path)
    meta = {k: v for k, v in read_metadata(data).items() if k != CHECKSUM_KEY}
    path.write_bytes(save_bytes({"mom2": moment}, metadata=meta))
    refused(lambda: load_second_moment(path, key), str(path), "no content checksum")


def probe_stats_user_file_with_bad_checksum(tmp_path, **_):
    path, data, _, _ = _stats_file(tmp_path)
    start, _ = tensor_spans(data)["mom2"]
    path.write_bytes(flip(data, start + 2, 2))
    refused(lambda: load_second_moment(path), str(path))


def probe_stats_cache_in_use(model, tokenizer, corpus_file, tmp_path, **_):
    """Damage in the cache that ``second_moments`` would read: refused naming it, file kept for inspection."""
    kwargs = dict(corpus=str(corpus_file), n_tokens=64, max_length=32, cache_folder=tmp_path, progress=False)
    second_moments(model, tokenizer, [1], **kwargs)
    (path,) = tmp_path.glob("*.safetensors")
    data = path.read_bytes()
    start, _ = tensor_spans(data)["mom2"]
    path.write_bytes(flip(data, start + 11, 6))
    damaged = path.read_bytes()
    refused(lambda: second_moments(model, tokenizer, [1], **kwargs), str(path))
    assert path.read_bytes() == damaged


# -- context templates ------------------------------------------------------------------------------------------------


@pytest.fixture()
def template_cache(model, tokenizer, tmp_path):
    templates = context_templates(model, tokenizer, [(5, 2)], cache_folder=tmp_path)
    (path,) = tmp_path.glob("*.json")
    return path, path.read_bytes(), templates


def probe_templates_bitflip_every_byte(template_cache, **_):
    path, data, templates = template_cache
    count = flips_refused_or_identical(
        path, data, list(range(len(data))), lambda: read_template_cache(path), lambda t: t == templates
    )
    assert count >= len(data) * 0.99


def probe_templates_cache_in_use(model, tokenizer, template_cache, tmp_path, **_):
    path, data, _ = template_cache
    path.write_bytes(flip(data, len(data) // 2, 1))
    refused(lambda: context_templates(model, tokenizer, [(5, 2)], cache_folder=tmp_path), str(path), "delete it")


def probe_templates_truncated(template_cache, **_):
    path, data, _ = template_cache
    for length in (0, 1, len(data) // 2, len(data) - 2):
        path.write_bytes(data[:length])
        refused(lambda: read_template_cache(path), str(path))


def probe_templates_old_list_format(template_cache, **_):
    path, _, templates = template_cache
    path.write_text(json.dumps(templates))
    refused(lambda: read_template_cache(path), str(path), "delete it")


def probe_templates_wrong_content_signed(template_cache, **_):
    path, _, _ = template_cache
    path.write_bytes(dumps_signed_json(["no placeholder here"], CACHE_FORMAT))
    refused(lambda: read_template_cache(path), str(path), "does not hold context templates")


# -- MEMIT z cache and the known-facts download -----------------------------------------------------------------------


def probe_memit_z_cache_bitflip(model, tokenizer, tmp_path, **_):
    hp = MEMITHyperParams.for_model(
        model, layers=[0, 1], fact_token="last", v_num_grad_steps=2, mom2_n_tokens=64, v_weight_decay=0.0
    )
    moments = {layer: torch.eye(model.config.intermediate_size) for layer in hp.layers}
    request = EditRequest("The {} is in", "Eiffel Tower", "Rome")
    kwargs = dict(second_moment=moments, templates=["{}"], z_cache=tmp_path / "z")
    compute_memit(model, tokenizer, [request], hp, **kwargs)
    (path,) = (tmp_path / "z").glob("z_*.safetensors")
    data = path.read_bytes()
    start, end = tensor_spans(data)["z"]
    path.write_bytes(flip(data, (start + end) // 2, 6))
    fp = model_fingerprint(model)
    refused(lambda: compute_memit(model, tokenizer, [request], hp, **kwargs), str(path), "delete it")
    unchanged(model, fp)


def probe_known_facts_download_bitflip(home, tmp_path, **_):
    records = [{"known_id": 0, "subject": "Paris", "attribute": "France", "prompt": "Paris is in"}]
    from factedit.integrity import write_with_sidecar

    cached = home / "data" / KNOWN_FILE
    data = json.dumps(records).encode()
    write_with_sidecar(cached, data)
    empty = tmp_path / "no-data"
    empty.mkdir()
    set_data_dir(empty)
    try:
        assert load_known_facts()[0].subject == "Paris"
        cached.write_bytes(flip(data, 20, 0))
        refused(lambda: load_known_facts(), str(cached), "download it again")
    finally:
        set_data_dir(None)


# -- converted-model cache --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_template(tmp_path_factory, tokenizer):
    """A converted-model folder as the converter writes it, holding a tiny llama (copied per probe)."""
    folder = tmp_path_factory.mktemp("converted") / "smollm2-135m"
    store_converted(
        tiny_model("llama", **SMALL), tokenizer, folder, {"source": "smollm2-135m", "gguf_file": "test.gguf"}
    )
    return folder


@pytest.fixture()
def converted(converted_template, home):
    folder = home / "models" / "smollm2-135m"
    shutil.copytree(converted_template, folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cache_refused(folder: Path, damaged: str) -> None:
    before = _snapshot(folder)
    refused(lambda: load_model("smollm2-135m"), str(folder / damaged), "delete the folder")
    after = _snapshot(folder)
    after.pop(VERIFIED_FILE, None)  # the record of verified files may be refreshed, nothing else
    before.pop(VERIFIED_FILE, None)
    assert after == before


def probe_model_cache_truncated_safetensors(converted, **_):
    data = (converted / "model.safetensors").read_bytes()
    (converted / "model.safetensors").write_bytes(data[: len(data) // 2])
    _cache_refused(converted, "model.safetensors")


def probe_model_cache_bitflip_safetensors(converted, **_):
    path = converted / "model.safetensors"
    data = path.read_bytes()
    spans = tensor_spans(data)
    where = positions(*header_span(data), 8) + [p for span in list(spans.values())[:4] for p in positions(*span, 2)]
    for i, byte in enumerate(where):
        path.write_bytes(flip(data, byte, i % 8))
        _cache_refused(converted, "model.safetensors")


def probe_model_cache_bad_config_json(converted, **_):
    (converted / "config.json").write_text("{ not json")
    _cache_refused(converted, "config.json")


def probe_model_cache_config_same_size_edit(converted, **_):
    path = converted / "config.json"
    text = path.read_text()
    path.write_text(text.replace('"hidden_size": 32', '"hidden_size": 64'))
    _cache_refused(converted, "config.json")


def probe_model_cache_bitflip_tokenizer_json(converted, **_):
    path = converted / "tokenizer.json"
    data = path.read_bytes()
    for i, byte in enumerate(positions(0, len(data), 4)):
        path.write_bytes(flip(data, byte, i))
        _cache_refused(converted, "tokenizer.json")


def probe_model_cache_missing_file(converted, **_):
    (converted / "tokenizer.json").unlink()
    _cache_refused(converted, "tokenizer.json")


def probe_model_cache_manifest_bitflip(converted, **_):
    path = converted / MANIFEST_FILE
    data = path.read_bytes()
    for i, byte in enumerate(positions(0, len(data), 6)):
        path.write_bytes(flip(data, byte, i % 8))
        before = _snapshot(converted)
        refused(lambda: load_model("smollm2-135m"), MANIFEST_FILE)
        assert _snapshot(converted) == before


def probe_model_cache_marker_corrupt(converted, **_):
    (converted / "factedit-cache.json").write_text('{"source": "gemma3-270m", "gguf_file": "test.gguf"}')
    _cache_refused(converted, "factedit-cache.json")


# -- model folders and GGUF files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder_template(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("folder") / "tiny"
    tiny_model("llama", **SMALL).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def folder(model_folder_template, tmp_path):
    return Path(shutil.copytree(model_folder_template, tmp_path / "tiny"))


def _state_of(target: Path):
    """What a probe must leave as it was: a folder's files, or a file's size and first 4 MB (GGUF probes
    write only a header into a sparse file)."""
    if target.is_dir():
        return _snapshot(target)
    if not target.exists():
        return None
    with open(target, "rb") as fh:
        return target.stat().st_size, fh.read(4 << 20)


def _load_refused(target: Path, home: Path, *names: str) -> None:
    before = _state_of(target)
    refused(lambda: load_model(str(target)), *names)
    assert _state_of(target) == before
    assert not home.exists() or not any(home.rglob("*")), "nothing may be created before the input is checked"


def probe_folder_empty(tmp_path, home, **_):
    empty = tmp_path / "empty"
    empty.mkdir()
    _load_refused(empty, home, str(empty), "config.json")


def probe_folder_garbage_config(folder, home, **_):
    (folder / "config.json").write_bytes(b"\x00\xffgarbage{")
    _load_refused(folder, home, str(folder / "config.json"))


def probe_folder_config_is_a_list(folder, home, **_):
    (folder / "config.json").write_text("[1, 2]")
    _load_refused(folder, home, str(folder / "config.json"), "model_type")


def probe_folder_no_weights(folder, home, **_):
    (folder / "model.safetensors").unlink()
    _load_refused(folder, home, str(folder), "no weights")


def probe_folder_truncated_safetensors(folder, home, **_):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    _load_refused(folder, home, str(folder / "model.safetensors"), "truncated")


def probe_folder_corrupt_safetensors_header(folder, home, **_):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(flip(data, 12, 7))
    _load_refused(folder, home, str(folder / "model.safetensors"))


def probe_folder_bad_tokenizer_json(folder, home, **_):
    (folder / "tokenizer.json").write_text('{"version": ')
    _load_refused(folder, home, str(folder / "tokenizer.json"))


def probe_folder_index_names_a_missing_shard(folder, home, **_):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard-1.safetensors"}}))
    _load_refused(folder, home, "shard-1.safetensors", "missing")


def probe_folder_too_large_for_memory(folder, home, **_):
    """Weights whose header says 4 TB (a sparse file): refused before loading, both sizes named."""
    weights = folder / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 4 * 10**12]}})
    weights.write_bytes(len(header).to_bytes(8, "little") + header.encode())
    try:
        with open(weights, "r+b") as fh:  # the declared size without using the disk
            fh.truncate(8 + len(header) + 4 * 10**12)
    except OSError:
        weights.unlink()
        pytest.skip("this file system has no sparse files of 4 TB")
    try:
        others = {p.name: p.read_bytes() for p in folder.iterdir() if p != weights}
        refused(lambda: load_model(str(folder)), "needs about 4000.0 GB", "available")
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p != weights} == others
        assert not home.exists()
    finally:
        weights.unlink()


@pytest.fixture(scope="module")
def gguf_header() -> tuple[bytes, int]:
    """The first 2 MB of the default model's GGUF file (its whole header and tensor table) and its size."""
    path = gguf_parts(REGISTRY["smollm2-135m"])[0]
    with open(path, "rb") as fh:
        return fh.read(2 << 20), path.stat().st_size


def _gguf(tmp_path, head: bytes, size: int | None = None) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(head)
    if size is not None:
        with open(path, "r+b") as fh:
            fh.truncate(size)  # sparse: tensor data reads as zeros, the header is the real one
    return path


def _gguf_refused(path: Path, home: Path, *names: str) -> None:
    _load_refused(path, home, str(path), *names)


def _tensor_info(head: bytes) -> int:
    """Where the n_dims field of ``token_embd.weight``'s tensor info starts."""
    name = b"token_embd.weight"
    at = head.index(len(name).to_bytes(8, "little") + name, 1_000_000)
    return at + 8 + len(name)


def probe_gguf_random_bytes(tmp_path, home, **_):
    path = _gguf(
        tmp_path, torch.randint(0, 256, (100_000,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    _gguf_refused(path, home, "not a GGUF file")


def probe_gguf_empty(tmp_path, home, **_):
    _gguf_refused(_gguf(tmp_path, b""), home, "not a valid GGUF file")


def probe_gguf_text_file(tmp_path, home, **_):
    _gguf_refused(_gguf(tmp_path, b"GGUF is a file format\n" * 4), home, "GGUF")


def probe_gguf_truncated(gguf_header, tmp_path, home, **_):
    head, size = gguf_header
    for length in (1000, 100_000, len(head)):
        _gguf_refused(_gguf(tmp_path, head[:length]), home)
    _gguf_refused(_gguf(tmp_path, head, size - 1000), home, "truncated")


def probe_gguf_bitflip_magic(gguf_header, tmp_path, home, **_):
    head, size = gguf_header
    for bit in range(8):
        _gguf_refused(_gguf(tmp_path, flip(head, bit % 4, bit), size), home, "not a GGUF file")


def probe_gguf_bitflip_version(gguf_header, tmp_path, home, **_):
    head, size = gguf_header
    for byte, bit in ((4, 2), (4, 3), (5, 0), (7, 7)):  # 3 -> 7, 11, 259, ... (3 -> 2 is a valid version)
        _gguf_refused(_gguf(tmp_path, flip(head, byte, bit), size), home, "version")


def probe_gguf_bitflip_counts(gguf_header, tmp_path, home, **_):
    head, size = gguf_header
    for byte in (15, 14, 23, 22):  # high bytes of the tensor and metadata counts
        _gguf_refused(_gguf(tmp_path, flip(head, byte, 6), size), home)


def probe_gguf_bitflip_string_length(gguf_header, tmp_path, home, **_):
    head, size = gguf_header
    _gguf_refused(_gguf(tmp_path, flip(head, 24 + 6, 5), size), home)  # first key's length, byte 6


def probe_gguf_bitflip_tensor_info(gguf_header, tmp_path, home, **_):
    head, size = gguf_header
    at = _tensor_info(head)
    for byte, bit in (
        (at, 3),  # n_dims 2 -> 10
        (at + 4 + 7, 7),  # first dimension's top bit
        (at + 12 + 6, 1),  # second dimension, huge
        (at + 20, 6),  # tensor type -> unknown
        (at + 24, 0),  # offset no longer aligned
        (at + 24 + 7, 7),  # offset past the end
    ):
        _gguf_refused(_gguf(tmp_path, flip(head, byte, bit), size), home)


# -- devices and dtypes -----------------------------------------------------------------------------------------------


def probe_device_banana(home, **_):
    refused(lambda: load_model(device="banana"), "banana", "available")
    assert not home.exists()


def probe_device_cuda_when_absent(home, **_):
    if torch.cuda.is_available():
        refused(lambda: resolve_device(f"cuda:{torch.cuda.device_count()}"), "does not exist")
    else:
        refused(lambda: load_model(device="cuda"), "cuda", "available: cpu")
    assert not home.exists()


def probe_device_cuda_7(home, **_):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    refused(lambda: load_model(device="cuda:7"), "cuda:7")
    assert not home.exists()


def probe_device_mps_when_absent(home, **_):
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    refused(lambda: load_model(device="mps"), "mps", "not available")
    assert not home.exists()


def probe_device_unsupported_type(home, **_):
    for spec in ("meta", "cpu:3", "cuda:-1", ""):
        if spec == "":
            assert resolve_device(spec) == torch.device("cpu")
            continue
        refused(lambda spec=spec: load_model(device=spec), spec)
    assert not home.exists()


def probe_dtype_int8(home, **_):
    refused(lambda: load_model(dtype="int8"), "int8", "float32")
    refused(lambda: resolve_dtype(torch.int8), "int8")
    assert not home.exists()


def probe_dtype_float64(home, **_):
    refused(lambda: load_model(dtype="float64"), "float64")
    refused(lambda: load_model(dtype=torch.float64), "float64")
    assert not home.exists()


# -- the command line -------------------------------------------------------------------------------------------------


def _cli_refused(args: list[str], *names: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in lines[0], (name, lines[0])


def probe_cli_device_banana(home, **_):
    _cli_refused(["predict", "The Eiffel Tower is in", "--device", "banana"], "banana")
    assert not home.exists()


def probe_cli_dtype_int8(home, **_):
    _cli_refused(["predict", "The Eiffel Tower is in", "--dtype", "int8"], "int8")


def probe_cli_empty_folder(tmp_path, home, **_):
    empty = tmp_path / "empty"
    empty.mkdir()
    _cli_refused(["predict", "x", "--model", str(empty)], "config.json")
    assert not any(empty.iterdir())


def probe_cli_gguf_random(tmp_path, home, **_):
    path = _gguf(tmp_path, b"\x01\x02" * 5000)
    _cli_refused(["generate", "x", "--model", str(path)], str(path))
    assert not home.exists()


def probe_cli_corrupt_model_cache(converted, **_):
    path = converted / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    _cli_refused(["predict", "x"], str(path), "delete the folder")


def probe_cli_corrupt_patch(folder, patch_file, **_):
    path, data = patch_file
    start, end = tensor_spans(data)[next(iter(tensor_spans(data)))]
    path.write_bytes(flip(data, (start + end) // 2, 4))
    _cli_refused(["predict", "x", "--model", str(folder), "--patch", str(path)], str(path))
    assert path.read_bytes() == flip(data, (start + end) // 2, 4)


PROBES = {
    name.removeprefix("probe_").replace("_", "-"): fn
    for name, fn in dict(globals()).items()
    if name.startswith("probe_")
}


@pytest.fixture()
def probe_context(request):
    """Only the fixtures a probe asks for (by parameter name) are built."""
    import inspect

    def context(fn):
        wanted = [p for p in inspect.signature(fn).parameters if p != "_"]
        return {name: request.getfixturevalue(name) for name in wanted}

    return context


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_probe(kind, probe_context):
    fn = PROBES[kind]
    fn(**probe_context(fn))


def test_probe_count():
    assert len(PROBES) >= 45, len(PROBES)
