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


def test_cli_edit_json_with_reference_stats(default_model, tmp_path):
    path = shared_reference() / "rome_official_smollm2" / "second_moment_layer6.safetensors"
    if not path.is_file():
        pytest.skip("reference statistics not available")
    hparams = tmp_path / "rome.json"  # 8 value steps: Rome at p = 0.97 already (CI time)
    hparams.write_text(json.dumps({"layers": [6], "v_num_grad_steps": 8}))
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
        "--hparams",
        str(hparams),
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


# -- checks before any work: output paths, the home folder, JSON files ----------------------------------------------
def test_output_and_home_checks_create_nothing(tmp_path, monkeypatch):
    from factedit.paths import check_home_writable, check_output_path, check_writable_dir

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        for path, message in [
            (a_file, "is a file"),
            (a_file / "sub" / "deeper", "inside"),
            (locked, "not writable"),
            (locked / "new" / "folder", "not writable"),
        ]:
            with pytest.raises(FactEditError, match=message):
                check_writable_dir(path, "--out")
        with pytest.raises(FactEditError, match="is a folder"):
            check_output_path(tmp_path, "--csv", folder=False)
        with pytest.raises(FactEditError, match="not writable"):
            check_output_path(locked / "table.csv", "--csv", folder=False)
        assert check_output_path(tmp_path / "new" / "run", "--out") == tmp_path / "new" / "run"
        monkeypatch.setenv("FACTEDIT_HOME", str(locked / "home"))
        with pytest.raises(FactEditError, match="FACTEDIT_HOME.*not writable.*set FACTEDIT_HOME"):
            check_home_writable(["models"])
        monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "stats").mkdir(mode=0o555)
        check_home_writable(["models"])
        with pytest.raises(FactEditError, match="cache folder .*stats is not writable"):
            check_home_writable(["models", "stats"])
        assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([*before, "home", "stats"])
    finally:
        locked.chmod(0o755)
        (tmp_path / "home" / "stats").chmod(0o755) if (tmp_path / "home" / "stats").exists() else None


@pytest.mark.parametrize(
    "data, message",
    [
        ('{"a": 1}'.encode("utf-16"), "UTF-16"),
        (b"\x00\x9f\x92\x96binary", "not UTF-8 text"),
        (b'{"a": "\xe9"}', "byte 0xe9"),
        (b'{"a": 1,}', "not valid JSON.*line 1 column 9"),
    ],
    ids=["utf16", "binary", "latin1", "trailing-comma"],
)
def test_json_files_fail_in_one_line(tmp_path, data, message):
    from factedit.paths import read_json_file

    path = tmp_path / "f.json"
    path.write_bytes(data)
    with pytest.raises(FactEditError, match=message) as info:
        read_json_file(path, "requests file")
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')  # a UTF-8 BOM is fine
    assert read_json_file(path, "x") == {"a": 1}


def test_atomic_writes_from_many_threads_never_share_a_temporary_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from factedit.paths import atomic_write_bytes

    target = tmp_path / "cache.bin"
    payloads = [bytes([i]) * 200_000 for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda data: [atomic_write_bytes(target, data) for _ in range(5)], payloads))
    assert target.read_bytes() in payloads  # whole, from one writer
    assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]  # no temporary file left behind


# -- prompts: one rule for braces, editing and display agree ------------------------------------------------------
@pytest.mark.parametrize(
    "prompt", ["The {} is in {0}", "The {} of {__class__}", "The {} is {", "The {} is }", "{} {{x}}"]
)
def test_prompts_with_other_braces_are_refused(prompt):
    with pytest.raises(FactEditError, match="braces other than"):
        EditRequest(prompt, "Eiffel Tower", "Rome")


def test_request_text_is_the_edited_text():
    """The subject is put in by plain replacement: a subject that looks like a format field stays literal, and the
    text shown is the text whose tokens are edited."""
    request = EditRequest("The {} is located in", "Eiffel Tower", "Rome")
    assert request.text == "The Eiffel Tower is located in"
    with pytest.raises(FactEditError, match="brace"):
        EditRequest("The {} is located in", "Eiffel {0} Tower", "Rome")
    with pytest.raises(FactEditError, match="true target already"):
        EditRequest("The {} is located in", "Eiffel Tower", "Paris", target_true=" Paris ")
    with pytest.raises(FactEditError, match="at most 2,000"):
        EditRequest("The {} is located in", "x" * 2001, "Rome")
    with pytest.raises(FactEditError, match="unknown key"):
        EditRequest.from_dict({"prompt": "The {} is", "subject": "X", "target": "Y", "tagret": "Z"})


# -- hyper-parameters: every number has a range ---------------------------------------------------------------------
def test_every_number_of_every_method_has_a_range():
    from pydantic import Field

    from factedit.editing.hparams import LIMITS, HyperParams, _numeric
    from factedit.editing.methods import METHODS

    classes = {m.hparams_class for m in METHODS.values() if m.hparams_class is not None}
    assert len(classes) == 7  # ROME, MEMIT, AlphaEdit, FT, FT-L, EMMET, UltraEdit
    for cls in classes:
        numbers = [name for name, f in cls.model_fields.items() if _numeric(f.annotation)]
        assert numbers and all(name in LIMITS for name in numbers), cls
    with pytest.raises(TypeError, match="give unbounded_steps a range"):

        class Unbounded(HyperParams):  # noqa: F841 - defining it is the test
            unbounded_steps: int = Field(3, ge=1)


def test_statistics_need_at_least_as_many_tokens_as_features(tokenizer):
    from .tiny_models import INTERMEDIATE, tiny_model

    model = tiny_model("llama")
    with pytest.raises(FactEditError, match=f"below the {INTERMEDIATE} features"):
        ROMEHyperParams.for_model(model, layers=[1], mom2_n_tokens=INTERMEDIATE - 1)
    assert ROMEHyperParams.for_model(model, layers=[1], mom2_n_tokens=INTERMEDIATE).mom2_n_tokens == INTERMEDIATE
    hp = ROMEHyperParams.for_model(model, layers=[1], mom2_adjustment=False, mom2_n_tokens=1)  # no statistics used
    assert hp.stats_spec is None


# -- the core refuses before the first forward pass ------------------------------------------------------------------
def test_predict_and_edit_refuse_bad_counts_and_texts(tokenizer):
    from factedit.editing.report import edit_and_compare
    from factedit.predict import generate, top_next_tokens

    from .tiny_models import MAX_POSITIONS, tiny_model

    model = tiny_model("llama")
    before = model_fingerprint(model)
    for k in (0, -1, 10**6):
        with pytest.raises(FactEditError, match="k must be"):
            top_next_tokens(model, tokenizer, ["hello"], k)
    with pytest.raises(FactEditError, match="text is empty"):
        top_next_tokens(model, tokenizer, ["hello", " "], 3)
    for tokens, message in ((0, "max_new_tokens"), (10**8, "max_new_tokens"), (MAX_POSITIONS, "context")):
        with pytest.raises(FactEditError, match=message):
            generate(model, tokenizer, "hello", max_new_tokens=tokens)
    top = top_next_tokens(model, tokenizer, ["The Eiffel Tower is in"], 1)[0][0][0].strip()
    request = EditRequest("The {} is in", "Eiffel Tower", top)
    with pytest.raises(FactEditError, match="already the model's top prediction"):
        edit_and_compare(model, tokenizer, request, "ft")
    with pytest.raises(FactEditError, match="paraphrase is empty"):
        edit_and_compare(model, tokenizer, EditRequest("The {} is in", "Eiffel Tower", "Rome"), "ft", paraphrases=[""])
    assert model_fingerprint(model) == before


def test_trace_dataset_and_eval_refuse_bad_counts_before_creating_folders(tokenizer, tmp_path):
    from factedit.evaluation import RunConfig, run_evaluation
    from factedit.tracing.dataset import trace_dataset

    from .tiny_models import tiny_model

    model = tiny_model("llama")
    for n in (0, -2):
        with pytest.raises(FactEditError, match="n \\(facts to trace\\)"):
            trace_dataset(model, tokenizer, tmp_path / "trace", n=n)
        with pytest.raises(FactEditError, match="n must be"):
            run_evaluation(model, tokenizer, RunConfig("none", "counterfact", n=n), tmp_path / "run", progress=False)
    with pytest.raises(FactEditError, match="samples must be"):
        trace_dataset(model, tokenizer, tmp_path / "trace", samples=10**6)
    with pytest.raises(FactEditError, match="unknown method"):
        run_evaluation(model, tokenizer, RunConfig("nope", "counterfact", n=1), tmp_path / "run", progress=False)
    assert not list(tmp_path.iterdir())


def test_a_malformed_record_does_not_stop_an_evaluation_run(tokenizer, tmp_path):
    """A ``{0}`` prompt (it used to kill the run in ``str.format``) and a 40,000-character prompt are skipped,
    logged and counted in the manifest with their reasons; the other cases are evaluated."""
    from factedit.evaluation import RunConfig, run_evaluation
    from factedit.evaluation.records import CASES, MANIFEST

    from .tiny_models import tiny_model

    def record(case_id: int, prompt: str) -> dict:
        rewrite = {"prompt": prompt, "subject": "Paris", "target_new": {"str": "Rome"}, "target_true": {"str": "Lyon"}}
        return {
            "case_id": case_id,
            "requested_rewrite": rewrite,
            "paraphrase_prompts": ["Paris is the capital of"],
            "neighborhood_prompts": ["Berlin is the capital of"],
        }

    data = tmp_path / "cf.json"
    data.write_text(json.dumps([record(0, "{} is in"), record(1, "{} is in {0}"), record(2, "{} " + "x" * 40_000)]))
    model = tiny_model("llama")
    out = tmp_path / "run"
    report = run_evaluation(
        model, tokenizer, RunConfig("none", "counterfact", data_path=str(data)), out, progress=False
    )
    assert (report.total, report.evaluated, report.skipped) == (1, 1, 2)
    manifest = json.loads((out / MANIFEST).read_text())
    reasons = {s["id"]: s["reason"] for s in manifest["dataset"]["skipped"]}
    assert manifest["dataset"]["n_skipped"] == 2 and manifest["selection"]["skipped_records"] == 2
    assert "braces" in reasons["1"] and "40,00" in reasons["2"]
    assert [json.loads(line)["case_id"] for line in (out / CASES).read_text().splitlines()] == [0]
