"""Statistics shared between dtypes of the same weights (issue 13), downward only.

Second moments computed on float32 weights also serve the same weights cast to bfloat16 or float16,
through a signed alias named by the cast model's key; whether the weights are "the same" is decided by
content (:func:`cast_fingerprint`). A float32 model never gets statistics computed on half-precision
weights, a model whose weights differ by one element gets none, and a damaged alias is refused.

Tiny random models and a tokenizer from a tiny GGUF file: nothing here loads the default model.
Whether a pass over the corpus ran is read from the cache folder (every pass saves a file) and the log.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from factedit.errors import FactEditError
from factedit.integrity import dumps_signed_json
from factedit.models.architectures import arch_for, get_parameter
from factedit.models.fingerprint import cast_fingerprint, model_fingerprint
from factedit.models.loading import load_model
from factedit.paths import compute_lock
from factedit.safetensors_meta import read_metadata
from factedit.stats.second_moment import (
    ALIAS_FORMAT,
    ALIAS_SUFFIX,
    StatsKey,
    alias_path,
    second_moments,
)

from .gguf_files import write_tiny_gguf
from .tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
LAYERS = [1, 2]
REUSED = "reused from"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level tokenizer (ids far below the tiny models' vocabulary)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_gguf(folder / "m.gguf", "llama")
    return AutoTokenizer.from_pretrained(folder, gguf_file="m.gguf")


@pytest.fixture
def stats(tok, corpus_file, tmp_path):
    """``stats(model, dtype="float32")``: second moments of LAYERS, cached in ``tmp_path / "stats"``."""
    folder = tmp_path / "stats"

    def run(model, dtype: str = "float32"):
        return second_moments(
            model, tok, LAYERS, corpus=str(corpus_file), n_tokens=300, max_length=64, dtype=dtype,
            cache_folder=folder, progress=False,
        )  # fmt: skip

    run.folder = folder
    return run


def _files(folder: Path) -> dict[str, int]:
    """Every file in the cache with its modification time: a pass over the corpus writes one."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def _stats_fingerprints(folder: Path) -> set[str]:
    return {read_metadata(p)["model_fingerprint"] for p in folder.glob("*.safetensors")}


# -- the cast fingerprint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_cast_fingerprint_is_the_fingerprint_of_the_cast_copy(family, dtype):
    model = tiny_model(family)
    model.register_buffer("counts", torch.arange(5))  # integer buffers keep their dtype under .to(dtype)
    before = model_fingerprint(model)
    cast = cast_fingerprint(model, dtype)
    assert cast == model_fingerprint(copy.deepcopy(model).to(dtype))
    assert cast != before and model_fingerprint(model, full=True) == before  # the model itself is untouched
    assert all(t.dtype == torch.float32 for t in model.parameters())


def test_cast_fingerprint_of_tied_embeddings_counts_both_names():
    model = tiny_model("gemma3")  # ties lm_head to the embeddings
    state = model.state_dict(keep_vars=True)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    cast = cast_fingerprint(model, torch.bfloat16)
    copied = copy.deepcopy(model).to(torch.bfloat16)
    assert copied.lm_head.weight is copied.model.embed_tokens.weight and cast == model_fingerprint(copied)
    with pytest.raises(FactEditError, match="floating-point torch dtype"):
        cast_fingerprint(model, torch.int8)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_folder_loaded_in_half_precision_has_the_cast_fingerprint(family, tok, tmp_path):
    """The real loading path (``from_pretrained(dtype=...)`` on a saved float32 folder) rounds exactly as
    ``.to(dtype)`` does, buffers and tied weights included."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert model_fingerprint(load_model(str(tmp_path))[0]) == model_fingerprint(model)
    for name, dtype in HALF.items():
        loaded, _ = load_model(str(tmp_path), dtype=name)
        assert model_fingerprint(loaded) == cast_fingerprint(model, dtype), name


# -- sharing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_float32_statistics_serve_the_half_precision_cast(dtype, stats, caplog):
    model = tiny_model("llama")
    on_float32 = stats(model)
    files = _files(stats.folder)
    assert sum(name.endswith(ALIAS_SUFFIX) for name in files) == 2 * len(LAYERS)  # bfloat16 and float16
    half = copy.deepcopy(model).to(dtype)
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        on_half = stats(half)
    assert _files(stats.folder) == files, "a second pass ran (it would have saved a file)"
    assert sum(REUSED in r.getMessage() for r in caplog.records) == len(LAYERS)
    for layer in LAYERS:
        assert on_half[layer].dtype == torch.float32 and on_half[layer].device == torch.device("cpu")
        assert torch.equal(on_half[layer], on_float32[layer])


def test_float64_accumulation_is_shared_under_its_own_key(stats, caplog):
    """float64 and float32 accumulation are different keys; each is shared with the casts on its own."""
    model = tiny_model("qwen2")
    on_float64 = stats(model, "float64")
    half = copy.deepcopy(model).to(torch.bfloat16)
    files = _files(stats.folder)
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        reused = stats(half, "float64")
    assert _files(stats.folder) == files and all(reused[k].dtype == torch.float64 for k in LAYERS)
    assert all(torch.equal(reused[k], on_float64[k]) for k in LAYERS)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        computed = stats(half, "float32")  # not shared from float64: computed on the bfloat16 weights
    assert not any(REUSED in r.getMessage() for r in caplog.records)
    assert len(_files(stats.folder)) == len(files) + len(LAYERS)
    assert all(computed[k].dtype == torch.float32 for k in LAYERS)


def test_half_precision_weights_that_differ_by_one_element_compute_their_own(stats, caplog):
    model = tiny_model("llama")
    stats(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    weight = get_parameter(half, arch_for(half).rewrite_weight_at(0))
    with torch.no_grad():
        weight[0, 1] += 1.0
    files = _files(stats.folder)
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        stats(half)
    assert not any(REUSED in r.getMessage() for r in caplog.records)
    new = set(_files(stats.folder)) - set(files)
    assert len(new) == len(LAYERS) and all(name.endswith(".safetensors") for name in new)  # no aliases: not float32
    assert model_fingerprint(half) in _stats_fingerprints(stats.folder)


def test_float32_never_reuses_statistics_of_half_precision_weights(stats, caplog):
    """Not even when its weights are exactly the upcast bfloat16 ones: it computes statistics of its own."""
    half = tiny_model("llama").to(torch.bfloat16)
    on_half = stats(half)
    assert not any(p.name.endswith(ALIAS_SUFFIX) for p in stats.folder.iterdir())  # bfloat16 weights: no alias
    upcast = copy.deepcopy(half).to(torch.float32)
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        on_upcast = stats(upcast)
    assert not any(REUSED in r.getMessage() for r in caplog.records)
    assert _stats_fingerprints(stats.folder) == {model_fingerprint(half), model_fingerprint(upcast)}
    assert all(not torch.equal(on_upcast[k], on_half[k]) for k in LAYERS)
    # the upcast model's aliases name the bfloat16 weights' key, whose own file still comes first
    caplog.clear()
    files = _files(stats.folder)
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        again = stats(half)
    assert _files(stats.folder) == files and not any(REUSED in r.getMessage() for r in caplog.records)
    assert all(torch.equal(again[k], on_half[k]) for k in LAYERS)


def _key_of(path: Path) -> StatsKey:
    meta = read_metadata(path)
    seed = meta["shuffle_seed"]
    return StatsKey(
        meta["model_fingerprint"], meta["module"], meta["corpus_id"], int(meta["n_tokens"]), int(meta["max_length"]),
        meta["dtype"], None if seed == "None" else int(seed), meta["document_start"],
    )  # fmt: skip


def test_a_valid_alias_under_a_float32_key_is_never_read(stats, caplog):
    """An alias that would hand bfloat16-computed statistics to a float32 model (factedit never writes
    one; here it is made by hand, correctly signed) is not even looked at: float32 weights compute."""
    half = tiny_model("llama").to(torch.bfloat16)
    stats(half)
    upcast = copy.deepcopy(half).to(torch.float32)
    for path in list(stats.folder.glob("*.safetensors")):
        source = _key_of(path)
        key = replace(source, model_fingerprint=model_fingerprint(upcast))
        record = {"key": asdict(key), "weights_dtype": "float32", "source_key": asdict(source),
                  "source_weights_dtype": "bfloat16", "target": source.filename()}  # fmt: skip
        alias_path(key, stats.folder).write_bytes(dumps_signed_json(record, ALIAS_FORMAT))
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        stats(upcast)
    assert not any(REUSED in r.getMessage() for r in caplog.records)
    assert _stats_fingerprints(stats.folder) == {model_fingerprint(half), model_fingerprint(upcast)}


# -- damaged aliases ------------------------------------------------------------------------------------------


def test_a_corrupt_or_mismatched_alias_is_refused_in_one_line(stats):
    model = tiny_model("llama")
    stats(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    cast = model_fingerprint(half)
    first, second = (
        alias_path(replace(_key_of(p), model_fingerprint=cast), stats.folder)
        for p in sorted(stats.folder.glob("*.safetensors"))  # layers 1 and 2
    )
    assert first.is_file() and second.is_file()
    original = first.read_bytes()
    first.write_bytes(original.replace(b'"n_tokens": 300', b'"n_tokens": 301', 1))
    files = _files(stats.folder)
    with pytest.raises(FactEditError, match=r"statistics alias .*alias\.json is corrupt.*delete it to recompute") as e:
        stats(half)
    assert "\n" not in str(e.value) and first.name in str(e.value)
    first.write_bytes(second.read_bytes())  # a valid alias, but for another layer's key
    with pytest.raises(
        FactEditError, match=r"alias .*alias\.json was written for other module .*delete it to recompute"
    ):
        stats(half)
    first.write_bytes(b"{not json")
    with pytest.raises(FactEditError, match=r"alias .*alias\.json is corrupt \(not valid JSON.*delete it to recompute"):
        stats(half)
    files[first.name] = first.stat().st_mtime_ns
    assert _files(stats.folder) == files, "a refused alias must leave the cache as it was"


def test_an_alias_whose_statistics_were_deleted_recomputes_cleanly(stats, caplog):
    model = tiny_model("llama")
    on_float32 = stats(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    layer1 = next(stats.folder.glob(f"{arch_for(model).rewrite_at(1)}-*.safetensors"))
    layer1.unlink()
    with caplog.at_level(logging.INFO, logger="factedit.stats.second_moment"):
        on_half = stats(half)
    messages = [r.getMessage() for r in caplog.records]
    assert any("which is gone" in m for m in messages) and sum(REUSED in m for m in messages) == 1  # layer 2 only
    assert torch.equal(on_half[2], on_float32[2]) and not torch.equal(on_half[1], on_float32[1])
    assert model_fingerprint(half) in _stats_fingerprints(stats.folder)  # layer 1 now has a file of its own


# -- two processes asking for the same statistics ---------------------------------------------------------------


def test_a_second_caller_waits_for_the_one_computing_and_reads_its_file(stats, caplog):
    """While one caller holds the locks beside the cache files, another asking for the same matrices waits,
    then reads what the first wrote instead of computing it again (flock locks of two open files conflict
    within one process too, so a thread stands in for the second process)."""
    model = tiny_model("llama")
    first = stats(model)
    files = {p: p.read_bytes() for p in stats.folder.glob("*.safetensors")}
    assert len(files) == len(LAYERS)
    got: dict[str, dict[int, torch.Tensor]] = {}
    waiter = threading.Thread(target=lambda: got.update(result=stats(model)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="factedit"):
        with compute_lock(files, "second moments"):
            for path in files:  # "the first process" is computing them
                path.unlink()
            waiter.start()
            waiter.join(timeout=1.0)
            assert waiter.is_alive() and not got, "the second caller did not wait for the lock"
            for path, data in files.items():  # ... and writes them
                path.write_bytes(data)
        waiter.join(timeout=60)
    assert not waiter.is_alive() and "waiting for another process computing second moments" in caplog.text
    assert "computing second moments for layer" not in caplog.text, "the second caller computed them again"
    for layer in LAYERS:
        torch.testing.assert_close(got["result"][layer], first[layer], rtol=0, atol=0)
