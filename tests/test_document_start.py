"""The document-start token: prepended where a tokenizer adds none, kept out of subject spans, in cache keys."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from factedit.models.tokens import add_document_start, document_start_of, document_start_token
from factedit.stats.second_moment import StatsKey
from factedit.text import encode_with_subject

from .gguf_files import write_tiny_gguf


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tokenizer_of(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_tiny_gguf(folder / "m.gguf", request.param)
    return request.param, lambda: AutoTokenizer.from_pretrained(folder, gguf_file="m.gguf")


def test_prepended_only_where_the_tokenizer_adds_nothing(tokenizer_of):
    family, make = tokenizer_of
    tok = make()
    bare = tok("Olot, located in")["input_ids"]
    expected = document_start_token(tok)
    token = add_document_start(tok)
    after = tok("Olot, located in")["input_ids"]
    if family == "gemma3":  # adds its BOS itself
        assert token == "" and expected is None and after == bare
    else:
        assert token == expected == "<|endoftext|>"
        assert after == [tok.convert_tokens_to_ids(token), *bare]
    assert add_document_start(tok) == token  # idempotent
    assert tok("Olot, located in")["input_ids"] == after
    assert document_start_of(tok) == token


def test_subject_span_is_found_after_the_start_token(tokenizer_of):
    _, make = tokenizer_of
    plain, started = make(), make()
    add_document_start(started)
    a = encode_with_subject(plain, "{}, located in", "Olot")
    b = encode_with_subject(started, "{}, located in", "Olot")
    shift = len(b.ids) - len(a.ids)
    assert (b.subject_first, b.subject_last) == (a.subject_first + shift, a.subject_last + shift)
    assert b.ids[b.subject_first : b.subject_last + 1] == a.ids[a.subject_first : a.subject_last + 1]


def test_statistics_key_names_the_start_token():
    base = StatsKey("fp", "model.layers.1.mlp.down_proj", "corpus", 1000, 64, "float32", None)
    with_start = StatsKey("fp", "model.layers.1.mlp.down_proj", "corpus", 1000, 64, "float32", None, "<|endoftext|>")
    assert base.filename() != with_start.filename()
    assert StatsKey("fp", "model.layers.1.mlp.down_proj", "corpus", 1000, 64, "float32", None, "").filename() == (
        base.filename()
    )
