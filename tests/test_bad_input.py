"""Bad input gets a clear error and changes neither the model nor files on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from factedit import EditRequest, FactEditError, ROMEHyperParams, compute_rome
from factedit.cli.main import app
from factedit.models import arch_for, load_model, model_fingerprint
from factedit.stats.second_moment import StatsKey, load_second_moment, second_moments, stats_path
from factedit.text import encode_with_subject, target_ids

from .conftest import shared_reference


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome"}, "exactly one"),
        ({"prompt": "{} and {} are in", "subject": "Eiffel Tower", "target_new": "Rome"}, "exactly one"),
        ({"prompt": "", "subject": "Eiffel Tower", "target_new": "Rome"}, "prompt is empty"),
        ({"prompt": "The {} is in", "subject": "   ", "target_new": "Rome"}, "subject is empty"),
        ({"prompt": "The {} is in", "subject": "Eiffel Tower", "target_new": " "}, "target is empty"),
    ],
)
def test_bad_requests(kwargs, message):
    with pytest.raises(FactEditError, match=message):
        EditRequest(**kwargs)


def test_subject_and_target_tokenization_errors(tokenizer):
    with pytest.raises(FactEditError, match="exactly one"):
        encode_with_subject(tokenizer, "no placeholder", "x")
    with pytest.raises(FactEditError, match="target is empty"):
        target_ids(tokenizer, "The Eiffel Tower is in", "")


def test_unknown_architecture_and_missing_model(tmp_path):
    with pytest.raises(FactEditError, match="unknown architecture 'bert'.*supported families are"):
        arch_for("bert")
    with pytest.raises(FactEditError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FactEditError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_layer_out_of_range_leaves_model_unchanged(default_model):
    model, tok = default_model
    before = model_fingerprint(model)
    with pytest.raises(FactEditError, match="out of range"):
        ROMEHyperParams.for_model(model, layers=[99])
    hp = ROMEHyperParams.for_model(model).replace(layers=[30])
    with pytest.raises(FactEditError, match="out of range"):
        compute_rome(model, tok, EditRequest("The {} is in", "Eiffel Tower", "Rome"), hp)
    assert model_fingerprint(model) == before


def test_unknown_hparam_keys_are_rejected(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"layers": [6], "v_lr": 0.5, "typo_field": 1}))
    with pytest.raises(FactEditError, match="typo_field"):
        ROMEHyperParams.from_json(path)


def test_corrupt_and_mismatched_stats_files(default_model, corpus_file, tmp_path):
    model, tok = default_model
    key = StatsKey(model_fingerprint(model), arch_for(model).rewrite_at(3), "x", 10, 8, "float32", None)
    path = stats_path(key, tmp_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    content = path.read_bytes()
    with pytest.raises(FactEditError, match="corrupt or truncated"):
        load_second_moment(path, key)
    assert path.read_bytes() == content  # left for the user to inspect

    wrong = tmp_path / "wrong.safetensors"
    save_file({"mom2": torch.ones(4, 5)}, str(wrong))
    with pytest.raises(FactEditError, match="shape"):
        load_second_moment(wrong)
    with pytest.raises(FactEditError, match="not found"):
        second_moments(model, tok, [1], corpus=str(tmp_path / "nothing.txt"), n_tokens=10, progress=False)


def _run(*args):
    return CliRunner().invoke(app, list(args))


def test_cli_errors_are_one_line_and_exit_2():
    for args, message in [
        (("edit", "--prompt", "no braces", "--subject", "X", "--target", "Y"), "exactly one"),
        (("edit", "--prompt", "The {} is", "--subject", "X", "--target", "Y", "--layer", "99"), "out of range"),
        (
            ("edit", "--prompt", "The {} is", "--subject", "X", "--target", "Y", "--model", "/no/such/dir"),
            "does not exist",
        ),
        (("patch", "show", "/no/such/patch.safetensors"), "not found"),
    ]:
        result = _run(*args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output


def test_cli_edit_json_with_reference_stats(default_model):
    path = shared_reference() / "rome_official_smollm2" / "second_moment_layer6.safetensors"
    if not path.is_file():
        pytest.skip("reference statistics not available")
    result = _run(
        "edit",
        "--prompt",
        "The {} is located in the city of",
        "--subject",
        "Eiffel Tower",
        "--target",
        "Rome",
        "--neighbour",
        "The Louvre is located in the city of",
        "--stats",
        str(path),
        "--layer",
        "6",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [p["kind"] for p in out["before"]] == ["prompt", "neighbour"]
    before, after = out["before"][0], out["after"][0]
    assert before["top"][0][0] == " Paris" and after["top"][0][0] == " Rome"
    assert after["p_target_new"] > after["p_target_true"] and before["p_target_new"] < before["p_target_true"]
    assert {"text", "top", "p_target_new", "p_target_true"} <= set(after)


def test_requests_file_with_bad_records_is_refused_whole(tmp_path):
    from factedit.editing.requests import load_requests

    path = tmp_path / "requests.json"
    path.write_text(
        json.dumps(
            [
                {"prompt": "The {} is located in", "subject": "Eiffel Tower", "target": "Rome"},
                {"prompt": "The Louvre is located in", "subject": "Eiffel Tower", "target": "Rome"},  # subject missing
                {"prompt": "{} plays", "subject": "LeBron James", "target": ""},  # empty target
                {"prompt": "Paris is in", "subject": "Paris", "target": "Italy"},  # subject spelled out: accepted
            ]
        )
    )
    content = path.read_text()
    with pytest.raises(FactEditError, match=r"2 bad request\(s\), nothing edited") as info:
        load_requests(path)
    assert "request 1: subject 'Eiffel Tower' not found" in str(info.value)
    assert "request 2: target is empty" in str(info.value)
    assert path.read_text() == content
    result = _run("edit", "--method", "memit", "--requests", str(path))
    assert result.exit_code == 2 and "nothing edited" in result.output


def test_empty_batch_and_mixed_options_are_refused_before_loading(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([]))
    result = _run("edit", "--method", "memit", "--requests", str(path))
    assert result.exit_code == 2 and "non-empty" in result.output
    result = _run("edit", "--method", "rome", "--requests", str(path), "--prompt", "The {} is")
    assert result.exit_code == 2 and "not both" in result.output


def test_conflicting_batch_is_refused_with_both_requests_named(tmp_path):
    """Same subject in the same leading text (so the same keys), different targets: refused whole."""
    path = tmp_path / "requests.json"
    content = json.dumps(
        [
            {"prompt": "{} is located in", "subject": "Eiffel Tower", "target": "Rome"},
            {"prompt": "{} was built in", "subject": "Eiffel Tower", "target": "1999"},
            {"prompt": "The capital of {} is", "subject": "France", "target": "Lyon"},
        ]
    )
    path.write_text(content)
    result = _run("edit", "--method", "memit", "--requests", str(path))
    output = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2
    assert "conflicting requests" in output and "'Eiffel Tower was built in' -> '1999'" in output
    assert path.read_text() == content
