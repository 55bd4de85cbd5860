"""Subject positions match the official code's; the default model loads from its package and cache;
every registered model's first use works with an empty home, also with two processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from factedit.models import load_model
from factedit.models.registry import REGISTRY, ModelSource, gguf_parts
from factedit.models.tokens import document_start_of
from factedit.text import encode_with_subject, target_ids

from .conftest import shared_reference


def test_subject_last_token_matches_official_lookup(tokenizer):
    """For all 10 reference cases x 21 templates, the subject's last token is where the official code looked."""
    root = shared_reference() / "rome_official_smollm2"
    if not root.is_dir():
        pytest.skip("reference outputs not available")
    templates = json.loads((root / "context_templates.json").read_text())
    cases = json.loads((root / "edits.json").read_text())["cases"]
    checked = 0
    shift = 1 if document_start_of(tokenizer) else 0  # the official code's tokenizer prepends nothing
    for case in cases:
        req = case["request"]
        ours = [
            encode_with_subject(tokenizer, t.replace("{}", req["prompt"]), req["subject"]).subject_last - shift
            for t in templates
        ]
        assert ours == case["lookup_idx"], case["case_id"]
        checked += len(ours)
    assert checked == 210


def test_subject_span_and_targets(tokenizer):
    enc = encode_with_subject(tokenizer, "The {} is located in the city of", "Eiffel Tower")
    tokens = tokenizer.convert_ids_to_tokens(enc.ids)
    assert "".join(tokens[enc.subject_first : enc.subject_last + 1]).replace("Ġ", " ").strip() == "Eiffel Tower"
    assert tokenizer.decode(target_ids(tokenizer, enc.text, " Rome")) == " Rome"
    assert len(target_ids(tokenizer, enc.text, " Buenos Aires")) >= 2


def test_default_model_comes_from_package_and_cache(default_model, tmp_path, monkeypatch):
    model, tok = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and not model.training
    (gguf,) = gguf_parts(REGISTRY["smollm2-135m"])
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # 20 s: a second conversion of the real model; CI loads .gguf paths of tiny models (test_distributed)
def test_gguf_path_loads_the_same_weights(default_model, tmp_path, monkeypatch):
    """A .gguf path is dequantized once, cached, and gives the same weights as the registry name."""
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path))
    model, _ = default_model
    (gguf,) = gguf_parts(REGISTRY["smollm2-135m"])
    first, _ = load_model(str(gguf))
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "factedit-cache.json").is_file()
    second, _ = load_model(str(gguf))  # from the safetensors cache this time
    for (name, a), b in zip(model.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    del first


# -- first use of every registered model, on tiny GGUF files in stand-in packages ---------------------


TINY_LAYERS = 2
PROCESSES = 3


def _write_tiny_llama_gguf(path: Path, *, hidden: int = 16, ffn: int = 32, heads: int = 2) -> dict[str, np.ndarray]:
    """A tiny random Llama with a byte-level BPE tokenizer, float32, written with the ``gguf`` package.
    Returns the embedding and output matrices, to check what gets loaded."""
    rng = np.random.default_rng(0)
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(TINY_LAYERS)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is a control token
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    matrices: dict[str, np.ndarray] = {}

    def random(name: str, *shape: int) -> None:
        matrices[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, matrices[name])

    random("token_embd.weight", len(tokens), hidden)
    random("output.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head = hidden // heads
    for i in range(TINY_LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        random(f"blk.{i}.attn_q.weight", hidden, hidden)
        random(f"blk.{i}.attn_k.weight", head, hidden)
        random(f"blk.{i}.attn_v.weight", head, hidden)
        random(f"blk.{i}.attn_output.weight", hidden, hidden)
        random(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        random(f"blk.{i}.ffn_up.weight", ffn, hidden)
        random(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return matrices


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[bytes, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    matrices = _write_tiny_llama_gguf(path)
    return path.read_bytes(), matrices


def _stand_in_packages(source: ModelSource, site: Path, data: bytes) -> None:
    """Lay ``data`` out the way ``source``'s packages hold their weights: one file, or chunks matching
    the registry's glob patterns (two per package, so order within and across packages both count)."""
    pattern = source.files[0]
    per_package = 2 if "*" in pattern else 1
    assert per_package == 2 or len(source.modules) == 1, "a plain file name can only be one chunk"
    n_chunks = per_package * len(source.modules)
    cuts = [len(data) * i // n_chunks for i in range(n_chunks + 1)]
    chunk = 0
    for module in source.modules:
        folder = site / module
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        for k in range(per_package):
            name = pattern.replace("*", f"{k:02d}")
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data[cuts[chunk] : cuts[chunk + 1]])
            chunk += 1


def _hidden_leftovers(home: Path) -> list[Path]:
    """Temporary files and folders (all cache writes go through hidden names first)."""
    return list(home.rglob(".*"))


def test_processes_converting_one_model_at_once(tiny_gguf, tmp_path):
    """One converts while the others wait on the cache lock and then read its copy (without the lock, as
    on non-POSIX systems, each writes private names and renames them into place): all succeed, one
    complete copy stays, nothing half-written is left, and an incomplete folder from an interrupted run
    is replaced."""
    data, matrices = tiny_gguf
    name = next(n for n, s in sorted(REGISTRY.items()) if len(s.modules) > 1)  # chunks: join and convert
    site, home = tmp_path / "site", tmp_path / "home"
    _stand_in_packages(REGISTRY[name], site, data)
    interrupted = home / "models" / name
    interrupted.mkdir(parents=True)
    (interrupted / "config.json").write_text("{")  # no marker: an interrupted conversion
    env = {
        **os.environ,
        "FACTEDIT_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    ready = tmp_path / "ready"
    ready.mkdir()
    # Imports take seconds and a tiny conversion milliseconds: each process says it is ready, then waits
    # for the other, so that their conversions overlap.
    script = "\n".join(
        [
            "import os, pathlib, time",
            "from factedit.models import load_model",
            f"ready = pathlib.Path({str(ready)!r})",
            "(ready / str(os.getpid())).touch()",
            "deadline = time.monotonic() + 120",
            f"while len(list(ready.iterdir())) < {PROCESSES} and time.monotonic() < deadline: time.sleep(0.001)",
            f"m, _ = load_model({name!r})",
            "print(m.get_input_embeddings().weight.sum().item())",
        ]
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(PROCESSES)
    ]
    results = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err[-2000:]
        assert float(out.split()[-1]) == pytest.approx(float(matrices["token_embd.weight"].sum()), abs=1e-4)
    assert json.loads((interrupted / "factedit-cache.json").read_text())["source"] == name
    assert (home / "gguf" / name / REGISTRY[name].gguf_name).read_bytes() == data
    assert not _hidden_leftovers(home)
