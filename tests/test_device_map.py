"""Device maps (``load_model(..., device_map=...)``) on tiny random models, on a CPU-only machine.

What a CPU can show: every bad map is refused in one line before anything is read; ``"auto"``
loads; a model whose blocks sit on two "devices" accelerate allows without a GPU (``cpu`` and
``disk``: offloaded modules keep ``meta`` placeholders and are read from the checkpoint at each
forward, through accelerate's hooks) computes what the whole model computes, and factedit finds
the embedding's device although the first parameter is on ``meta``; ROME edits a resident layer
of such a model in bfloat16 and float16 and the patch reverts bit-exact; edits of offloaded
layers are refused with nothing changed; tracing runs through the offloaded blocks. Layers on
two GPUs need a machine with two (docs/devices.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from factedit.editing.ft import FTHyperParams, compute_ft
from factedit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from factedit.editing.memit import compute_memit
from factedit.editing.requests import EditRequest
from factedit.editing.rome import compute_rome
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, get_parameter
from factedit.models.loading import load_model
from factedit.models.placement import (
    device_map_of,
    input_device,
    model_devices,
    module_device,
    offloaded_value,
    parse_device_map,
)
from factedit.text import encode_with_subject
from factedit.tracing.core import causal_trace

from .requests_for_tests import REQUEST, TEMPLATES
from .tiny_models import tiny_model

SETTINGS = dict(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=10)
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Hello. The weather today is nice and warm.",
    "The Louvre is in Paris, and Rome is in Italy.",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as the tiny models' configs expect
# On disk (the rest on cpu): the upper blocks and, in float32, the embedding too (then the first parameter is
# on meta); half-precision models keep their embedding resident, as reading 12M weights per forward is slow.
OFFLOADED = ("model.layers.2", "model.layers.3")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (milliseconds; no model download)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL[1], eos_token=SPECIAL[2], pad_token=SPECIAL[2]
    )


def _split_map(embedding_on_disk: bool = True) -> dict[str, str]:
    names = [
        "model.embed_tokens",
        *(f"model.layers.{i}" for i in range(4)),
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    ]
    on_disk = {*OFFLOADED, *(["model.embed_tokens"] if embedding_on_disk else [])}
    return {name: "disk" if name in on_disk else "cpu" for name in names}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama folders (float32, bfloat16, float16 weights) with their tokenizer."""
    root = tmp_path_factory.mktemp("device-map")
    tok = _tokenizer()
    out = {}
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        # half precision: wide enough for an edit to land (tests/test_dtypes.py); float32: the smallest, as its
        # embedding (on disk) is read at every forward
        size = dict(hidden=256, intermediate=512) if dtype != torch.float32 else {}
        model = tiny_model("llama", **size).to(dtype)
        folder = root / label
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[label] = folder
    return out


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))


def _map_file(tmp_path: Path, content: str | dict) -> Path:
    path = tmp_path / "map.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(FactEditError, match=match) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_device_is_refused_before_anything_is_read(tmp_path):
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    path = _map_file(tmp_path, {"model.embed_tokens": "cpu", "model.layers.0": missing})
    # the model path does not even exist: the device map is checked first, and nothing is created
    message = _refused(r"module 'model.layers.0': device 'cuda:\d+'", str(tmp_path / "no-model"), device_map=path)
    assert "available" in message
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{bad json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ("{}", "is empty"),
        ('{"model.layers.0": "meta"}', "'meta' holds no weights"),
        ('{"model.layers.0": "banana"}', "unknown device 'banana'"),
        ('{"model.layers.0": true}', "is not a device name"),
        ('{"": "disk"}', "puts every module on disk"),
    ],
)
def test_malformed_device_map_files_are_refused(tmp_path, content, match):
    _refused(match, str(tmp_path / "no-model"), device_map=_map_file(tmp_path, content))


def test_device_map_file_not_found(tmp_path):
    _refused("device map file .* not found", "smollm2-135m", device_map=str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model.layers.9": "cpu"}, r"names modules this model does not have: 'model.layers.9' \(its blocks are "),
        ({"model.layers.1.mlp": "cpu"}, "names both 'model.layers.1' and 'model.layers.1.mlp'"),
        ({"lm_head": None}, "gives no device to 'lm_head.weight'"),
        ({"": "cpu"}, "names both '' and 'model.embed_tokens'"),
    ],
)
def test_device_map_that_does_not_fit_the_model_is_refused(folders, tmp_path, change, match):
    mapping = {k: v for k, v in {**_split_map(), **change}.items() if v is not None}
    _refused(match, str(folders["float32"]), device_map=_map_file(tmp_path, mapping))


def test_device_map_splitting_a_block_is_refused(folders):
    mapping = {**_split_map(), "model.layers.0": None, "model.layers.0.mlp": "disk", "model.layers.0.self_attn": "cpu"}
    mapping = {k: v for k, v in mapping.items() if v is not None}
    _refused(r"splits the block 'model.layers.0'", str(folders["float32"]), device_map=mapping)


def test_integer_devices_are_gpu_indices():
    if torch.cuda.is_available():
        assert parse_device_map({"": 0}) == {"": "cuda:0"}
    else:
        with pytest.raises(FactEditError, match="no usable CUDA GPU"):
            parse_device_map({"": 0})
    assert parse_device_map(" AUTO ") == "auto" and parse_device_map(None) is None
    assert parse_device_map({"": torch.device("cpu"), "x": " Disk "}) == {"": "cpu", "x": "disk"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to name a device other than the CPU")
def test_device_and_device_map_together_are_refused(folders):
    _refused("give a device or a device map, not both", str(folders["float32"]), device="cuda:0", device_map="auto")


def test_auto_on_this_machine_matches_the_whole_model(folders):
    plain, tok = load_model(str(folders["float32"]))
    auto, _ = load_model(str(folders["float32"]), device_map="auto")
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = auto(input_ids=ids.to(input_device(auto))).logits.cpu()
    if torch.cuda.is_available():  # accelerate fills the GPU first
        assert input_device(auto).type == "cuda"
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    else:
        assert input_device(auto) == torch.device("cpu") and device_map_of(auto) is None
        assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def split_models(folders) -> dict:
    """Per dtype, the tiny model loaded whole and loaded with layers 2, 3 and the embedding on disk."""
    out = {}
    for label, folder in folders.items():
        whole, tok = load_model(str(folder), dtype=label)
        split, _ = load_model(str(folder), dtype=label, device_map=_split_map(embedding_on_disk=label == "float32"))
        out[label] = (whole, split, tok)
    return out


def test_blocks_on_two_devices_compute_what_the_whole_model_does(split_models):
    whole, split, tok = split_models["float32"]
    assert device_map_of(split) == _split_map()
    assert next(split.parameters()).device.type == "meta"  # why next(model.parameters()).device is not used
    assert input_device(split) == torch.device("cpu") and model_devices(split) == [torch.device("cpu")]
    assert module_device(split, "model.layers.2.mlp.down_proj") == torch.device("cpu")  # execution device
    assert module_device(split, "model.layers.2.mlp.act_fn") == torch.device("cpu")  # no tensors of its own
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=1e-5)
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(offloaded_value(split, name), get_parameter(whole, name))  # what a fingerprint must read
    assert offloaded_value(split, "model.layers.1.mlp.down_proj.weight") is None  # resident


def _resident(model) -> dict[str, torch.Tensor]:
    """Copies of the weights held on the modules (offloaded ones are ``meta`` placeholders)."""
    return {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}


def _unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    now = _resident(model)
    return now.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in now.items())


def _rome(model, tok, layer: int, **overrides):
    hp = ROMEHyperParams.for_model(model, layers=[layer], **{**SETTINGS, **overrides})
    return compute_rome(model, tok, REQUEST, hp, templates=TEMPLATES, second_moment={layer: _moment(model, layer)})


@pytest.mark.parametrize("label", ["bfloat16", "float16"])
def test_half_precision_edit_on_a_split_model_lands_and_reverts_bit_exact(split_models, label):
    whole, split, tok = split_models[label]
    arch = arch_for(split)
    before = _resident(split)
    result = _rome(split, tok, layer=1)
    assert _unchanged(split, before), "computing changed the model"
    handle = result.patch.apply(split)
    weight = get_parameter(split, arch.rewrite_weight_at(1))
    assert weight.dtype == getattr(torch, label) and not torch.equal(weight, before[arch.rewrite_weight_at(1)])
    ids = torch.tensor([tok(REQUEST.text)["input_ids"]])
    target = tok(" " + REQUEST.target_new, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        assert int(split(input_ids=ids).logits[0, -1].argmax()) == target
    handle.revert()
    assert _unchanged(split, before), "revert is not bit-exact"


def test_edits_of_offloaded_layers_are_refused_with_nothing_changed(split_models):
    whole, split, tok = split_models["float32"]
    with pytest.raises(FactEditError, match=r"cannot edit with ROME: 'model.layers.2.mlp.down_proj.weight' is off"):
        _rome(split, tok, layer=2)
    with pytest.raises(FactEditError, match="is offloaded to disk"):
        compute_ft(split, tok, REQUEST, FTHyperParams.for_model(split, layers=[3], num_steps=1))
    patch = _rome(whole, tok, layer=2).patch  # computed on the whole model, where layer 2 is resident
    before = _resident(split)
    with pytest.raises(FactEditError, match=r"cannot apply rome patch .* is offloaded to disk") as info:
        patch.apply(split)
    assert "\n" not in str(info.value)
    assert _unchanged(split, before)


def test_tracing_runs_through_offloaded_blocks(split_models):
    whole, split, tok = split_models["float32"]
    settings = dict(kinds=["hidden", "mlp", "attn", "hidden_sever_mlp"], samples=3, noise=0.1, window=2)
    fast = causal_trace(split, tok, REQUEST.text, REQUEST.subject, **settings)
    official = causal_trace(split, tok, REQUEST.text, REQUEST.subject, method="straightforward", **settings)
    reference = causal_trace(whole, tok, REQUEST.text, REQUEST.subject, **settings)
    for kind in settings["kinds"]:
        assert np.isfinite(fast.scores[kind]).all()
        np.testing.assert_allclose(fast.scores[kind], official.scores[kind], rtol=0, atol=1e-5)
        np.testing.assert_allclose(fast.scores[kind], reference.scores[kind], rtol=0, atol=1e-6)


def _moment(model, layer: int) -> torch.Tensor:
    """A symmetric positive definite stand-in for the statistics C (not the identity), on the CPU."""
    dim = get_parameter(model, arch_for(model).rewrite_weight_at(layer)).shape[1]
    return torch.eye(dim) + 0.1 * torch.ones(dim, dim) / dim


def _memit(model, tok, layers: list[int]):
    hp = MEMITHyperParams.for_model(model, layers=layers, mom2_update_weight=1.0, **SETTINGS)
    moments = {layer: _moment(model, layer) for layer in layers}
    requests = [REQUEST, EditRequest("{} is in the city of", "The Colosseum", "Paris")]
    return compute_memit(model, tok, requests, hp, second_moment=moments, templates=TEMPLATES)


def test_edits_of_a_split_model_equal_those_of_the_whole_model(split_models):
    """Same weights, same arithmetic: ROME (both value paths), MEMIT and FT give the whole model's patch."""
    whole, split, tok = split_models["float32"]
    for compute in (
        lambda m: _rome(m, tok, layer=1),
        lambda m: _rome(m, tok, layer=1, prefix_cache=False),
        lambda m: _memit(m, tok, layers=[0, 1]),
        lambda m: compute_ft(m, tok, REQUEST, FTHyperParams.for_model(m, layers=[1], num_steps=3)),
    ):
        on_split, on_whole = compute(split).patch, compute(whole).patch
        assert on_split.weight_names == on_whole.weight_names
        for a, b in zip(on_split.entries, on_whole.entries, strict=True):
            torch.testing.assert_close(a.delta(), b.delta(), rtol=1e-4, atol=1e-6)


# -- on GPUs (skipped on a CPU-only machine) ----------------------------------------------------------------------

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_map(two: bool) -> dict[str, str]:
    """One GPU: layers 2, 3 offloaded to the CPU (computed on cuda:0). Two: layers 2, 3 and the final norm on
    cuda:1, the embedding, layers 0, 1 and the LM head on cuda:0 (the head apart from the final norm)."""
    upper = "cuda:1" if two else "cpu"
    return {
        "model.embed_tokens": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:0",
        "model.layers.2": upper,
        "model.layers.3": upper,
        "model.norm": "cuda:1" if two else "cuda:0",
        "model.rotary_emb": "cuda:0",
        "lm_head": "cuda:0",
    }


@pytest.mark.parametrize(
    "two",
    [
        pytest.param(False, marks=pytest.mark.skipif(_GPUS < 1, reason="needs a GPU")),
        pytest.param(True, marks=pytest.mark.skipif(_GPUS < 2, reason="needs two GPUs")),
    ],
    ids=["cuda0-cpu-offload", "cuda0-cuda1"],
)
def test_edits_patches_and_tracing_across_gpus(folders, two):
    whole, tok = load_model(str(folders["float32"]))
    placed, _ = load_model(str(folders["float32"]), device_map=_gpu_map(two))
    assert input_device(placed) == torch.device("cuda:0")
    edited = 2 if two else 1  # a layer on cuda:1 when there is one
    before = _resident(placed)
    rome = _rome(placed, tok, layer=edited)
    memit = _memit(placed, tok, layers=[1, 2] if two else [0, 1])  # keys and z on different GPUs when two
    assert _unchanged(placed, before)
    for patch, reference in ((rome.patch, _rome(whole, tok, layer=edited).patch), (memit.patch, None)):
        if reference is not None:
            for a, b in zip(patch.entries, reference.entries, strict=True):
                torch.testing.assert_close(a.delta(), b.delta(), rtol=1e-2, atol=1e-4)
        handle = patch.apply(placed)
        for name in patch.weight_names:
            assert get_parameter(placed, name).device.type == "cuda"
        handle.revert()
        assert _unchanged(placed, before), "revert is not bit-exact"
    if not two:
        with pytest.raises(FactEditError, match="is offloaded to cpu"):
            _rome(placed, tok, layer=2)
    encoded = encode_with_subject(tok, REQUEST.prompt, REQUEST.subject)
    settings = dict(kinds=["hidden", "mlp", "attn"], samples=3, noise=0.1, window=2)
    fast = causal_trace(placed, tok, REQUEST.text, REQUEST.subject, **settings)
    official = causal_trace(placed, tok, REQUEST.text, REQUEST.subject, method="straightforward", **settings)
    reference = causal_trace(whole, tok, REQUEST.text, REQUEST.subject, **settings)
    for kind in settings["kinds"]:
        tail = slice(encoded.subject_first, None)
        np.testing.assert_allclose(fast.scores[kind][tail], official.scores[kind][tail], rtol=0, atol=1e-4)
        np.testing.assert_allclose(fast.scores[kind][tail], reference.scores[kind][tail], rtol=0, atol=1e-3)
