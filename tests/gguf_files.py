"""Tiny GGUF models written with the ``gguf`` package, laid out the way llama.cpp writes real ones.

A test that goes through factedit's GGUF loading path (package lookup, chunk joining, dequantization
by ``transformers``, the float32 cache) needs a GGUF file of the right family, but the real weight
packages are hundreds of MB and CI installs only the default one. :func:`write_tiny_gguf` takes a tiny
random model from :mod:`tests.tiny_models`, shrinks its vocabulary to a few hundred tokens, and writes
it in llama.cpp's conventions: architecture keys under ``<arch>.``, tensor names from gguf's own
name map, q/k rows of Llama permuted, Gemma's norms stored as ``1 + w``, no ``output.weight`` when the
embeddings are tied, and a tokenizer in the metadata (byte-level BPE for Llama/Qwen2, a sentencepiece
vocabulary with byte fallback for Gemma 3). Files are a few hundred KB.

It returns the weights a correct reader must get back, so a test can compare what was loaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import Gemma3TextConfig, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .tiny_models import tiny_model

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gemma3")
LAYERS = 2
# The text tests encode; every word is made of the merged pieces below, so it tokenizes into few tokens.
SAMPLE_TEXT = "the cat is in the house"
# How the 2-D weights are stored: plain floats, or Q8_0 blocks (dequantized by transformers, as real files are).
MATRIX_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
}

_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
# Pieces merged pairwise, left to right, from single characters: enough to make SAMPLE_TEXT a few tokens.
_WORDS = (" the", " cat", " is", " in", " house", "the")
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 3, 6
# No GGUF key carries Gemma 3's query scale: a reader takes the config class's default (the real 270M model's 256).
_GEMMA_QUERY_SCALAR = Gemma3TextConfig().query_pre_attn_scalar


def write_tiny_gguf(
    path: str | Path, family: str, *, matrix_type: str = "F16", layers: int = LAYERS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write a tiny random ``family`` model (``llama``, ``qwen2`` or ``gemma3``) as one GGUF file at ``path``.

    Returns the state dict of :func:`reference_model` as a correct GGUF reader gives it back (float32,
    Hugging Face names, the 2-D weights rounded through ``matrix_type``), so loaded weights can be compared
    exactly, and ``reference_model(...)`` with these weights loaded gives the logits the file should give.
    """
    if family not in _ARCH:
        raise KeyError(f"no tiny GGUF writer for {family!r}; known: {', '.join(FAMILIES)}")
    if matrix_type not in MATRIX_TYPES:
        raise KeyError(f"unknown matrix type {matrix_type!r}; known: {', '.join(MATRIX_TYPES)}")
    tokenizer = _vocab(family)
    model = reference_model(family, layers=layers, seed=seed)
    config = model.config
    arch = gguf.MODEL_ARCH_NAMES[_ARCH[family]]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny test {family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if family == "llama":
        writer.add_rope_dimension_count(head_dim)  # transformers reads it as head_dim
        writer.add_vocab_size(config.vocab_size)
    if family == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if matrix_type == "F16" else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer)

    expected = _add_tensors(writer, model, family, MATRIX_TYPES[matrix_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def byte_level_tokenizer(folder: Path, family: str = "llama"):
    """The small byte-level tokenizer of a tiny GGUF file written to ``folder`` (no real weights, no lock)."""
    from transformers import AutoTokenizer

    write_tiny_gguf(folder / "m.gguf", family)
    return AutoTokenizer.from_pretrained(folder, gguf_file="m.gguf")


def wide_tiny_model(tok, family: str = "llama", layers: int = 2) -> PreTrainedModel:
    """A tiny random model sized to ``tok``'s vocabulary, its weights spread wide enough (init 0.5) that
    argmax ties, float noise deciding a token, do not happen."""
    model = tiny_model(family, init=0.5, layers=layers)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model.eval()


def chat_template(family: str) -> str | None:
    """The chat template written into a ``family`` file (ChatML for the instruct-style Llama and Qwen2 ones;
    Gemma 3's pretrained model has none)."""
    return _vocab(family)["chat_template"]


# -- the model --------------------------------------------------------------------------------------


def reference_model(family: str, *, layers: int = LAYERS, seed: int = 0) -> PreTrainedModel:
    """The Hugging Face model :func:`write_tiny_gguf` writes (same arguments, same weights before rounding).

    A tiny model from :mod:`tests.tiny_models` with the small vocabulary of the file's tokenizer, and random
    (not constant) norms and biases, so that a reader that drops an offset or a bias is caught too. Gemma 3's
    ``query_pre_attn_scalar`` is the config default, which a GGUF reader assumes (the file has no key for it).
    """
    if family not in _ARCH:
        raise KeyError(f"no tiny GGUF writer for {family!r}; known: {', '.join(FAMILIES)}")
    model = tiny_model(family, layers=layers, seed=seed)
    if family == "gemma3":
        config = copy.deepcopy(model.config)
        config.query_pre_attn_scalar = _GEMMA_QUERY_SCALAR
        rebuilt = type(model)(config)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt.to(torch.float32).eval()
    model.resize_token_embeddings(len(_vocab(family)["tokens"]), mean_resizing=False)  # keeps the first rows
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _rope_theta(config) -> float:
    """The rope base of the global layers (Gemma 3 keeps one per layer type; a GGUF file stores that one)."""
    params = config.rope_parameters
    if "full_attention" in params:
        params = params["full_attention"]
    return float(params["rope_theta"])


def _add_tensors(
    writer: gguf.GGUFWriter, model: PreTrainedModel, family: str, matrix_type: gguf.GGMLQuantizationType
) -> dict[str, torch.Tensor]:
    config = model.config
    name_map = gguf.get_tensor_name_map(_ARCH[family], config.num_hidden_layers)
    tied = bool(config.tie_word_embeddings)
    expected: dict[str, torch.Tensor] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output matrix for tied embeddings; the reader ties it back
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"gguf has no tensor name for {hf_name} ({family})")
        values = tensor.detach().to(torch.float32).numpy()
        if values.ndim == 1:
            # 1-D tensors stay float32, as llama.cpp keeps them
            stored = values + np.float32(1) if family == "gemma3" and hf_name.endswith("norm.weight") else values
            writer.add_tensor(gguf_name, stored.astype(np.float32))
            # Gemma's RMSNorm scales by 1 + w and llama.cpp's by w: the reader subtracts the 1 again
            read = stored - np.float32(1) if stored is not values else stored
            expected[hf_name] = torch.from_numpy(np.ascontiguousarray(read, dtype=np.float32))
            continue
        if family == "llama" and ("self_attn.q_proj" in hf_name or "self_attn.k_proj" in hf_name):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            stored = _rotary_halves_to_pairs(values, heads)
        else:
            stored = values
        data = gguf.quants.quantize(stored, matrix_type) if matrix_type != gguf.GGMLQuantizationType.F32 else stored
        if matrix_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data)
        elif matrix_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=matrix_type)
        # every block lies within one row, so rounding commutes with the row permutation above
        rounded = gguf.quants.dequantize(gguf.quants.quantize(values, matrix_type), matrix_type)
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(rounded, dtype=np.float32))
    if tied:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    return expected


def _rotary_halves_to_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama's q/k projections: within each head, the rotary dimensions that
    Hugging Face keeps in two halves are interleaved in pairs. transformers undoes this when reading."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


# -- the tokenizer ----------------------------------------------------------------------------------


def _merge_pieces(words: tuple[str, ...], alphabet: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Merges that build each word left to right from its characters (spelled in ``alphabet``), and the
    merged pieces, without repeats, in the order they are first made."""
    merges: list[tuple[str, str]] = []
    pieces: list[str] = []
    for word in words:
        spelled = [alphabet.get(ch, ch) for ch in word]
        piece = spelled[0]
        for ch in spelled[1:]:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
            piece += ch
            if piece not in pieces:
                pieces.append(piece)
    return merges, pieces


def _vocab(family: str) -> dict:
    return _gemma_vocab() if family == "gemma3" else _byte_level_vocab(family)


def _byte_level_vocab(family: str) -> dict:
    """A GPT-2 style byte-level BPE (as SmolLM2 and Qwen2.5 use): the 256 byte symbols, a few merges,
    and ChatML's special tokens (first for SmolLM2's layout, last for Qwen2's)."""
    byte_symbols = list(bytes_to_unicode().values())
    merges, pieces = _merge_pieces(_WORDS, {" ": "Ġ"})
    normal = byte_symbols + pieces
    if family == "llama":
        tokens = [*_CHAT_TOKENS, *normal]
        types = [_TOKEN_CONTROL] * len(_CHAT_TOKENS) + [_TOKEN_NORMAL] * len(normal)
        ids = dict(bos=1, eos=2, unk=0, pad=2)
        pre = "smollm"
    else:
        tokens = [*normal, *_CHAT_TOKENS]
        types = [_TOKEN_NORMAL] * len(normal) + [_TOKEN_CONTROL] * len(_CHAT_TOKENS)
        first = len(normal)
        ids = dict(bos=first, eos=first + 2, unk=None, pad=first)
        pre = "qwen2"
    return dict(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        types=types,
        merges=[f"{a} {b}" for a, b in merges],
        scores=None,
        ids=ids,
        add_bos=False,
        chat_template=_CHATML,
    )


def _gemma_vocab() -> dict:
    """A sentencepiece vocabulary the way Gemma 3's GGUF spells it: control tokens, the 256 byte-fallback
    tokens, then pieces with ``▁`` for a space and no merges (transformers rebuilds them from the order)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    _, pieces = _merge_pieces(_WORDS, {" ": "▁"})
    letters = sorted({ch for word in _WORDS for ch in word.replace(" ", "▁")})
    tokens = [*specials, *byte_tokens, *letters, *(p for p in pieces if p not in letters)]
    types = [_TOKEN_CONTROL] * len(specials) + [_TOKEN_BYTE] * len(byte_tokens)
    types += [_TOKEN_NORMAL] * (len(tokens) - len(types))
    scores = [-1000.0] * len(specials) + [0.0] * len(byte_tokens)
    scores += [-float(i) for i in range(len(tokens) - len(scores))]
    return dict(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        merges=None,
        scores=scores,
        ids=dict(bos=2, eos=1, unk=3, pad=0),
        add_bos=True,
        chat_template=None,
    )


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: dict) -> None:
    writer.add_tokenizer_model(tokenizer["model"])
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    if tokenizer["scores"] is not None:
        writer.add_token_scores(tokenizer["scores"])
    if tokenizer["merges"] is not None:
        writer.add_token_merges(tokenizer["merges"])
    ids = tokenizer["ids"]
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    if ids["unk"] is not None:
        writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(tokenizer["add_bos"])
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer["chat_template"]:
        writer.add_chat_template(tokenizer["chat_template"])
