"""Integrity: the weights fingerprint covers every byte, every file factedit writes is checksummed and
verified on read, and the caches stay keyed by the true content of the weights (issue 18).

The bad-input side (one refusal per kind of damage) is in ``test_probes_integrity.py``; here is the
behaviour that must keep working: what the fingerprint sees and how its cache is invalidated, the
file formats and their legacy rules, the manifest of converted models and its verification memory,
and the web-app poisoning sequence (statistics computed while a patch is applied are keyed by those
weights, never filed as the unedited model's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from factedit.editing.hparams import StatsSpec
from factedit.editing.patch import FORMAT_V2, METADATA_KEY, Patch, PatchEntry, PatchStack
from factedit.editing.resources import EditResources
from factedit.errors import FactEditError
from factedit.integrity import (
    CHECKSUM_KEY,
    MANIFEST_FILE,
    VERIFIED_FILE,
    forget_verified,
    read_with_sidecar,
    sign,
    tensor_bytes_sha256,
    verify_manifest,
    write_manifest,
    write_with_sidecar,
)
from factedit.models import arch_for, load_model, model_fingerprint
from factedit.models.devices import resolve_device
from factedit.models.fingerprint import forget_digests, model_identity, tensor_sha256
from factedit.models.loading import (
    available_ram,
    check_memory,
    read_gguf_info,
    store_converted,
)
from factedit.models.registry import REGISTRY, gguf_parts
from factedit.safetensors_meta import read_metadata

from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_element_patch(model, name: str, value: float = 1000.0) -> Patch:
    """A dense patch changing only ``W[0, 1]`` of ``name``: what sampled fingerprints never saw."""
    weight = model.get_parameter(name)
    delta = torch.zeros(weight.shape)
    delta[0, 1] = value
    entry = PatchEntry(name=name, shape=tuple(weight.shape), base_sha256=tensor_sha256(weight), dense=delta)
    return Patch.for_model(model, method="upload", entries=[entry], base_fingerprint=model_fingerprint(model))


# -- the fingerprint ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["inplace", "data"])
def test_one_element_of_layer_6_changes_the_fingerprint(default_model, how):
    """The issue's probe on the real model: ``W[0, 1] += 1000`` of layer 6's down_proj, in place under
    ``no_grad`` and through ``param.data`` (which does not bump the version counter)."""
    model, _ = default_model
    param = model.get_parameter(arch_for(model).rewrite_weight_at(6))
    base = model_fingerprint(model)
    original = param.detach().clone()
    version = param._version
    try:
        if how == "inplace":
            with torch.no_grad():
                param[0, 1] += 1000
        else:
            param.data[0, 1] += 1000
        changed = model_fingerprint(model)
        assert changed != base
        assert changed == model_fingerprint(model, full=True)  # the cached answer is the full hash's
        if how == "data":
            assert param._version == version  # why the content check exists
    finally:
        with torch.no_grad():
            param.copy_(original)
    assert model_fingerprint(model) == base


def test_tensor_digest_is_the_sha256_of_its_bytes():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(700, 800, generator=gen)  # over the 1 MiB threshold: remembered
    cases = [big, big.T, big.to(torch.bfloat16), torch.tensor(3.5), torch.arange(10, dtype=torch.int64), big[:, 5:]]
    for t in cases:
        expected = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert tensor_bytes_sha256(t) == expected
        assert tensor_sha256(t) == expected
        assert tensor_sha256(t) == expected  # the remembered answer too


def test_remembered_digests_follow_every_kind_of_write():
    t = torch.randn(600, 600, generator=torch.Generator().manual_seed(1))
    first = tensor_sha256(t)
    t[3, 4] += 1  # version bump
    second = tensor_sha256(t)
    view = t.numpy()  # shares memory, no version counter at all
    view[100, 7] += 1
    third = tensor_sha256(t)
    assert len({first, second, third}) == 3
    assert third == tensor_bytes_sha256(t)
    forget_digests(t)
    assert tensor_sha256(t) == third


def test_patch_writes_change_and_restore_the_fingerprint():
    model = tiny_model("llama", hidden=256, intermediate=1536)  # down_proj over 1 MiB: the cached path
    name = arch_for(model).rewrite_weight_at(1)
    base = model_fingerprint(model)
    stack = PatchStack(model)
    stack.push(_one_element_patch(model, name))
    edited = model_fingerprint(model)
    assert edited != base and edited == model_fingerprint(model, full=True)
    stack.pop()
    assert model_fingerprint(model) == base


def test_the_poisoning_sequence_keys_statistics_by_the_true_weights(tokenizer, corpus_file, tmp_path):
    """Upload a patch changing one element (layer 0), edit (statistics of layer 1 needed): the statistics
    are computed on the patched weights and cached under *their* fingerprint; once the patch is reverted,
    the unedited model gets its own statistics, never the ones computed on the patched weights."""
    model = tiny_model("llama", hidden=256, intermediate=1536)
    cache = tmp_path / "stats"
    spec = StatsSpec(corpus=str(corpus_file), n_tokens=256, max_length=64)
    resources = EditResources(model, tokenizer, cache_folder=cache)
    base = resources.base_fingerprint
    uploaded = Patch.from_bytes(_one_element_patch(model, arch_for(model).rewrite_weight_at(0), 50.0).to_bytes())
    stack = PatchStack(model)
    stack.push(uploaded)
    patched_fp = model_fingerprint(model)
    assert patched_fp != base
    on_patched = resources.second_moments([1], spec)[1]
    keys = {read_metadata(p)["model_fingerprint"] for p in cache.glob("*.safetensors")}
    assert keys == {patched_fp}  # nothing was filed under the unedited weights
    stack.pop()
    on_base = EditResources(model, tokenizer, cache_folder=cache).second_moments([1], spec)[1]
    keys = {read_metadata(p)["model_fingerprint"] for p in cache.glob("*.safetensors")}
    assert keys == {patched_fp, base}
    assert not torch.equal(on_base, on_patched)


# -- file formats -----------------------------------------------------------------------------------------


def _tiny_patch(model) -> Patch:
    return _one_element_patch(model, arch_for(model).rewrite_weight_at(1), 1e-3)


def test_patch_files_carry_a_checksum_and_old_ones_load_with_a_warning(caplog):
    model = tiny_model("llama")
    data = _tiny_patch(model).to_bytes()
    meta = read_metadata(data)
    assert CHECKSUM_KEY in meta and json.loads(meta[METADATA_KEY])["format"] == "factedit-patch-v3"
    tensors = load_bytes(data)
    # a v2 file (written before checksums): loads, with a warning that it cannot be verified
    v2_meta = json.loads(meta[METADATA_KEY]) | {"format": FORMAT_V2}
    v2 = save_bytes(tensors, metadata={METADATA_KEY: json.dumps(v2_meta)})
    with caplog.at_level(logging.WARNING, logger="factedit.editing.patch"):
        loaded = Patch.from_bytes(v2, source="old.safetensors")
    assert "no content checksum" in caplog.text
    assert torch.equal(loaded.entries[0].dense, tensors[f"{loaded.entries[0].name}.dense"])
    # ... but a v2 file that has a checksum must match it, and a v3 file must have one
    signed_v2 = save_bytes(tensors, metadata=sign(tensors, {METADATA_KEY: json.dumps(v2_meta)}))
    assert Patch.from_bytes(signed_v2).weight_names == loaded.weight_names
    tampered = save_bytes(tensors, metadata={**read_metadata(signed_v2), "extra": "x"})
    with pytest.raises(FactEditError, match="does not match its checksum"):
        Patch.from_bytes(tampered)
    unsigned_v3 = save_bytes(tensors, metadata={METADATA_KEY: meta[METADATA_KEY]})
    with pytest.raises(FactEditError, match="no content checksum"):
        Patch.from_bytes(unsigned_v3)


def test_patch_apply_checks_each_entry_against_its_weight():
    model = tiny_model("llama")
    patch = _tiny_patch(model)
    other = arch_for(model).rewrite_weight_at(2)
    renamed = Patch(
        method=patch.method,
        entries=[PatchEntry(**{**patch.entries[0].__dict__, "name": other})],
        base_fingerprint=patch.base_fingerprint,
        model_identity=patch.model_identity,
    )
    before = model_fingerprint(model)
    with pytest.raises(FactEditError, match="computed on another weight"):
        renamed.apply(model)
    assert model_fingerprint(model) == before
    renamed.apply(model, force=True).revert()  # force is the documented way past both weight checks
    assert model_fingerprint(model) == before


def test_known_facts_download_is_verified(tmp_path, caplog):
    path = tmp_path / "known_1000.json"
    data = json.dumps([{"subject": "x", "attribute": "y", "prompt": "x is"}]).encode()
    write_with_sidecar(path, data)
    assert read_with_sidecar(path, "known facts") == data
    path.write_bytes(data.replace(b"y", b"z"))
    with pytest.raises(FactEditError, match="known_1000.json.sha256"):
        read_with_sidecar(path, "known facts")
    (tmp_path / "known_1000.json.sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="factedit.integrity"):
        assert read_with_sidecar(path, "known facts") == data.replace(b"y", b"z")
    assert "no checksum" in caplog.text


# -- converted models -----------------------------------------------------------------------------------------


def test_manifest_verification_is_remembered_by_inode_size_and_times(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.bin").write_bytes(os.urandom(1000))
    (folder / "b.json").write_text('{"x": 1}')
    write_manifest(folder, extra={"marker": {"source": "test"}})
    assert verify_manifest(folder, "test folder")["marker"] == {"source": "test"}
    record = json.loads((folder / VERIFIED_FILE).read_text())
    assert set(record) == {"a.bin", "b.json"}
    forget_verified(folder)
    verify_manifest(folder, "test folder")  # from the on-disk record, in a "new process"
    original = (folder / "b.json").read_bytes()
    (folder / "b.json").write_text('{"x": 2}')  # same size, other content: hashed again, refused
    with pytest.raises(FactEditError, match="b.json is corrupt"):
        verify_manifest(folder, "test folder")
    (folder / "b.json").write_bytes(original)  # put back: verified again and accepted
    verify_manifest(folder, "test folder")
    assert MANIFEST_FILE not in record


@pytest.fixture()
def tiny_home(tmp_path, monkeypatch, tokenizer):
    """A FACTEDIT_HOME whose converted 'smollm2-135m' is a tiny random llama, written by the converter's
    own ``store_converted`` (so the real cache is never touched)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FACTEDIT_HOME", str(home))
    model = tiny_model("llama", hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    folder = home / "models" / "smollm2-135m"
    store_converted(model, tokenizer, folder, {"source": "smollm2-135m", "gguf_file": "test.gguf"})
    return folder, model


def test_converted_cache_loads_and_reverifies_after_a_rewrite(tiny_home):
    folder, original = tiny_home
    model, _ = load_model("smollm2-135m")
    assert model_fingerprint(model) == model_fingerprint(original)
    assert (folder / MANIFEST_FILE).is_file() and (folder / VERIFIED_FILE).is_file()
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    os.utime(weights, ns=(1, 1))  # touched only: verified again (ctime changed), still the same bytes
    load_model("smollm2-135m")
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FactEditError, match="model.safetensors is corrupt.*delete the folder"):
        load_model("smollm2-135m")


def test_a_cache_from_before_manifests_is_rebuilt_not_trusted(tiny_home):
    from factedit.models.loading import _usable_cache

    folder, _ = tiny_home
    assert _usable_cache(folder)
    (folder / MANIFEST_FILE).unlink()
    assert not _usable_cache(folder)  # load_model converts it again


# -- loading checks ---------------------------------------------------------------------------------------------


def test_memory_check_names_both_sizes():
    free = available_ram()
    if free is None:
        pytest.skip("available memory unknown on this platform")
    with pytest.raises(FactEditError, match=r"needs about .* GB .* only .* available"):
        check_memory(free * 4, torch.device("cpu"), "model x", torch.float32)
    check_memory(1024, torch.device("cpu"), "model x", torch.float32)


def test_devices_that_exist_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        assert resolve_device(f"cuda:{torch.cuda.device_count() - 1}").type == "cuda"


def test_gguf_header_of_the_default_model_reads_in_milliseconds():
    info = read_gguf_info(gguf_parts(REGISTRY["smollm2-135m"])[0])
    assert info.version == 3 and info.architecture == "llama" and info.n_tensors > 100
    assert 100_000_000 < info.n_elements < 200_000_000  # SmolLM2-135M


def test_model_identity_is_unchanged_by_weights():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert model_identity(a) == model_identity(b) and model_fingerprint(a) != model_fingerprint(b)
