"""Patch files are untrusted input: malformed metadata and duplicate entries are refused on load,
and applying is all or nothing (tiny random llama; no download). Files key tensors by weight name
and carry a content checksum (files altered here are re-signed, so that the check under test is
reached; damage itself is probed in test_probes_integrity.py); files of the first, index-keyed
layout still load. ``factedit patch apply/revert`` round-trips a
model folder bit-exact in the dtype it was written in."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from typer.testing import CliRunner

from factedit.cli.main import app
from factedit.editing.patch import FORMAT, FORMAT_V1, REPLACED_FILE, Patch, PatchEntry, read_patch_metadata
from factedit.errors import FactEditError
from factedit.integrity import CHECKSUM_KEY, sign
from factedit.models import arch_for, model_fingerprint
from factedit.models.fingerprint import model_identity, tensor_sha256
from factedit.safetensors_meta import read_header, read_metadata
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _patch(model, layers=(0, 1), scale=1e-2) -> Patch:
    arch = arch_for(model)
    entries = []
    for layer in layers:
        name = arch.rewrite_weight_at(layer)
        weight = model.get_parameter(name)
        gen = torch.Generator().manual_seed(layer)
        entries.append(
            PatchEntry(
                name=name,
                shape=tuple(weight.shape),
                base_sha256=tensor_sha256(weight),
                dense=scale * torch.randn(weight.shape, generator=gen),
            )
        )
    return Patch(
        method="test",
        entries=entries,
        base_fingerprint=model_fingerprint(model),
        model_identity=model_identity(model),
        requests=[{"prompt": "{} is", "subject": "x"}],
        hparams={"layers": list(layers)},
        model_name="tiny-llama",
    )


def _with_meta(data: bytes, **changes) -> bytes:
    meta = json.loads(read_metadata(data)["factedit_patch"])
    meta.update(changes)
    tensors = load_bytes(data)
    return save_bytes(tensors, metadata=sign(tensors, {"factedit_patch": json.dumps(meta)}))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_round_trip_is_exact(model):
    before = _state(model)
    patch = Patch.from_bytes(_patch(model).to_bytes())
    assert patch.model_name == "tiny-llama"
    patch.apply(model)
    assert not torch.equal(model.get_parameter(patch.entries[0].name), before[patch.entries[0].name])
    patch.revert(model)
    assert _same(model, before)


def test_files_key_tensors_by_weight_name(model):
    patch = _patch(model)
    header = read_header(patch.to_bytes())
    assert sorted(k for k in header if k != "__metadata__") == sorted(f"{e.name}.dense" for e in patch.entries)
    assert json.loads(header["__metadata__"]["factedit_patch"])["format"] == FORMAT
    assert len(header["__metadata__"][CHECKSUM_KEY]) == 64


def test_old_index_keyed_files_still_load(model):
    """A file in the first layout, built here from tensors: keys "0.dense", "1.left"/"1.right", format v1."""
    arch = arch_for(model)
    dense_name, factor_name = arch.rewrite_weight_at(0), arch.rewrite_weight_at(1)
    dense_w, factor_w = model.get_parameter(dense_name), model.get_parameter(factor_name)
    gen = torch.Generator().manual_seed(3)
    dense = 1e-2 * torch.randn(dense_w.shape, generator=gen)
    left = torch.randn(factor_w.shape[0], 1, generator=gen)
    right = 1e-2 * torch.randn(1, factor_w.shape[1], generator=gen)
    meta = {
        "format": FORMAT_V1,
        "method": "rome",
        "version": "0.1.0",
        "base_fingerprint": model_fingerprint(model),
        "model_identity": model_identity(model),
        "requests": [{"prompt": "{} is in", "subject": "x", "target_new": "y"}],
        "hparams": {"layers": [0, 1]},
        "info": {},
        "entries": [
            {"name": dense_name, "shape": list(dense_w.shape), "transposed": False, "base_sha256": "", "kind": "dense"},
            {
                "name": factor_name,
                "shape": list(factor_w.shape),
                "transposed": False,
                "base_sha256": "",
                "kind": "factors",
            },
        ],
    }
    old = save_bytes(
        {"0.dense": dense, "1.left": left, "1.right": right}, metadata={"factedit_patch": json.dumps(meta)}
    )
    loaded = Patch.from_bytes(old)
    assert loaded.model_name == "" and loaded.weight_names == (dense_name, factor_name)
    assert torch.equal(loaded.entries[0].dense, dense) and torch.equal(loaded.entries[1].left, left)
    # the same edit in the new layout, and the same weights once applied
    again = Patch.from_bytes(loaded.to_bytes())
    assert set(read_header(loaded.to_bytes())) - {"__metadata__"} == {
        f"{dense_name}.dense",
        f"{factor_name}.left",
        f"{factor_name}.right",
    }
    before = _state(model)
    loaded.apply(model)
    edited = _state(model)
    loaded.revert(model)
    again.apply(model)
    assert _same(model, edited)
    again.revert(model)
    assert _same(model, before)


def test_missing_or_extra_tensors_are_refused(model):
    data = _patch(model).to_bytes()
    tensors = load_bytes(data)
    meta = read_metadata(data)
    first = next(iter(tensors))
    fewer = {k: v for k, v in tensors.items() if k != first}
    with pytest.raises(FactEditError, match="does not match its checksum"):
        Patch.from_bytes(save_bytes(fewer, metadata=meta))
    with pytest.raises(FactEditError, match="missing the tensor"):
        Patch.from_bytes(save_bytes(fewer, metadata=sign(fewer, meta)))
    more = {**tensors, "extra": torch.zeros(2)}
    with pytest.raises(FactEditError, match="no entry uses"):
        Patch.from_bytes(save_bytes(more, metadata=sign(more, meta)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"requests": 5}, "requests"),
        ({"requests": ["x"]}, "requests"),
        ({"requests": [{"prompt": 5}]}, "prompt"),
        ({"hparams": {"layers": "x"}}, "layers"),
        ({"hparams": []}, "hparams"),
        ({"base_fingerprint": 7}, "base_fingerprint"),
        ({"method": None}, "method"),
        ({"model_name": {"a": 1}}, "model_name"),
        ({"model_name": 5}, "model_name"),
        ({"format": "factedit-patch-v9"}, "unsupported patch format"),
        ({"entries": []}, "entries"),
        ({"entries": [{"name": ["a"], "shape": [2, 2], "transposed": False, "kind": "dense"}]}, "malformed"),
        ({"entries": [{"name": "a", "shape": [2, "2"], "transposed": False, "kind": "dense"}]}, "malformed"),
    ],
)
def test_malformed_metadata_is_refused(model, changes, message):
    data = _with_meta(_patch(model).to_bytes(), **changes)
    with pytest.raises(FactEditError, match=message):
        Patch.from_bytes(data)


def test_duplicate_entries_are_refused(model):
    patch = _patch(model, layers=(0, 0))
    with pytest.raises(FactEditError, match="two entries for one weight"):
        Patch.from_bytes(patch.to_bytes())
    fingerprint = model_fingerprint(model)
    with pytest.raises(FactEditError, match="two entries for one weight"):
        patch.apply(model)
    assert model_fingerprint(model) == fingerprint


def test_apply_is_all_or_nothing(model):
    before = _state(model)
    patch = _patch(model)
    # the second entry's delta fits the weight but cannot be read (meta device): apply fails after the first write
    broken = replace(patch.entries[1], dense=torch.empty(patch.entries[1].shape, device="meta"))
    patch = replace(patch, entries=[patch.entries[0], broken])
    with pytest.raises((NotImplementedError, RuntimeError)):
        patch.apply(model)
    assert _same(model, before)
    assert not patch.is_applied(model)


def test_entries_that_do_not_fit_are_refused_before_any_write(model):
    before = _state(model)
    patch = _patch(model)
    wrong = replace(patch.entries[1], dense=torch.zeros(3, 3))
    with pytest.raises(FactEditError, match="do not fit"):
        replace(patch, entries=[patch.entries[0], wrong]).apply(model)
    assert _same(model, before)


def test_patch_is_immutable(model):
    patch = _patch(model)
    with pytest.raises(AttributeError):
        patch.base_fingerprint = "0" * 32
    assert isinstance(patch.entries, tuple)


def test_save_writes_one_file_and_removes_a_stale_sidecar(model, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "patch.json").write_text(json.dumps({"format": "factedit-patch-v1", "method": "old"}))
    path = _patch(model).save(folder)
    assert path == folder / "patch.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["patch.safetensors"]
    assert read_patch_metadata(folder)["model_name"] == "tiny-llama"
    result = CliRunner().invoke(app, ["patch", "show", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "test"
    shown = CliRunner().invoke(app, ["patch", "show", str(path)])
    assert shown.exit_code == 0 and "tiny-llama" in shown.stdout


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, default_model):
    """A tiny llama saved as a model folder with the default tokenizer (what ``--model`` loads)."""
    folder = tmp_path_factory.mktemp("tiny") / "base"
    tiny_model("llama", seed=5).save_pretrained(folder)
    default_model[1].save_pretrained(folder)
    return folder


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_apply_and_revert_round_trip(model_folder, tmp_path, dtype):
    from factedit.models import load_model

    base, _ = load_model(str(model_folder), dtype=dtype)
    patch = _patch(base, layers=(1,), scale=0.1)
    patch_file = patch.save(tmp_path / "patch")
    run = CliRunner().invoke
    edited, restored = tmp_path / "edited", tmp_path / "restored"
    result = run(
        app, ["patch", "apply", str(patch_file), "--model", str(model_folder), "--out", str(edited), "--dtype", dtype]
    )
    assert result.exit_code == 0, result.output
    assert (edited / REPLACED_FILE).is_file() and not (edited / "factedit-originals.safetensors").exists()
    name = patch.entries[0].name
    assert not torch.equal(_weights(edited)[name], base.get_parameter(name).detach())
    # revert needs only the folder and the patch file, and loads the folder in its own dtype
    result = run(app, ["patch", "revert", str(patch_file), "--model", str(edited), "--out", str(restored)])
    assert result.exit_code == 0, result.output
    expected = {k: v.detach() for k, v in base.state_dict().items()}
    got = _weights(restored)
    assert got[name].dtype == getattr(torch, dtype)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_cli_refuses_bad_out_before_loading(model_folder, tmp_path):
    patch_file = _patch(tiny_model("llama", seed=5), layers=(1,)).save(tmp_path / "patch")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("y")
    run = CliRunner().invoke
    for out, message in [(a_file, "is a file"), (full, "not empty")]:
        for command in (
            ["apply", str(patch_file), "--model", "/no/such/model"],
            ["revert", str(patch_file), "--model", "/no/such/model"],
        ):
            result = run(app, ["patch", *command, "--out", str(out)])
            assert result.exit_code == 2 and message in result.output, result.output
    assert a_file.read_text() == "x" and sorted(p.name for p in full.iterdir()) == ["keep.txt"]


def test_cli_revert_refuses_another_patch(model_folder, tmp_path):
    from factedit.models import load_model

    base, _ = load_model(str(model_folder))
    first, second = _patch(base, layers=(1,)), _patch(base, layers=(1,), scale=2e-2)
    edited = tmp_path / "edited"
    run = CliRunner().invoke
    assert (
        run(
            app, ["patch", "apply", str(first.save(tmp_path / "a")), "--model", str(model_folder), "--out", str(edited)]
        ).exit_code
        == 0
    )
    result = run(
        app,
        [
            "patch",
            "revert",
            str(second.save(tmp_path / "b")),
            "--model",
            str(edited),
            "--out",
            str(tmp_path / "restored"),
        ],
    )
    assert result.exit_code == 2 and "another patch" in result.output, result.output
    # the folder holds float32 weights: they cannot be restored bit-exact into bfloat16 ones
    result = run(
        app,
        [
            "patch",
            "revert",
            str(tmp_path / "a"),
            "--model",
            str(edited),
            "--out",
            str(tmp_path / "restored"),
            "--dtype",
            "bfloat16",
        ],
    )
    assert result.exit_code == 2 and "load the model with that dtype" in result.output, result.output
    assert not (tmp_path / "restored").exists()
