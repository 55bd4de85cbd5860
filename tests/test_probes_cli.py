"""Bad input probes of the command line: every one a clean refusal.

Each probe is one kind of bad input (a file that is not UTF-8, a prompt with other braces, an output
folder that cannot be written, an absurd count...) given to the real ``factedit`` command in-process
(typer's CliRunner on ``factedit.cli.main:app``). Every probe must end with exit status 2 and exactly
one line on stderr (``error: ...``, no traceback) that names the offending thing, with nothing on
stdout and nothing created or changed: the probe's folder, the working directory, the home folder
and the converted default model are listed (names, sizes, modification times) before and after.

Most probes are refused before the model is loaded (that is part of what they check: they take
milliseconds); the few that need the model (the vocabulary size, the number of layers or features,
the model's current answer) load the cached default model. Two subprocess probes check that the
error is one line on a pipe too, under a narrow ``COLUMNS``.

``python -m pytest tests/test_probes_cli.py -q`` prints the count of probe kinds; every kind is one
parametrized test id.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factedit.cli.main import app

EDIT = ["edit", "--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome"]
TRACE = ["trace", "--prompt", "The Space Needle is in", "--subject", "Space Needle"]
LONG = "x" * 40_000


def _edit(prompt: str = "The {} is located in the city of", subject: str = "Eiffel Tower", target: str = "Rome"):
    return ["edit", "--prompt", prompt, "--subject", subject, "--target", target]


def _requests(records) -> Callable[[Path], str]:
    """A setup writing ``records`` as a requests file."""

    def write(root: Path) -> str:
        path = root / "requests.json"
        path.write_text(json.dumps(records))
        return str(path)

    return write


def _raw(data: bytes, name: str = "file.json") -> Callable[[Path], str]:
    def write(root: Path) -> str:
        (root / name).write_bytes(data)
        return str(root / name)

    return write


def _hparams(values) -> Callable[[Path], str]:
    return _raw(json.dumps(values).encode(), "hparams.json")


def _hparams_text(text: str) -> Callable[[Path], str]:
    return _raw(text.encode(), "hparams.json")


def _file(root: Path) -> str:
    (root / "afile").write_text("not a folder")
    return str(root / "afile")


def _inside_file(root: Path) -> str:
    return _file(root) + "/sub"


def _read_only(root: Path) -> str:
    folder = root / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def _read_only_child(root: Path) -> str:
    return _read_only(root) + "/new"


def _nonempty(root: Path) -> str:
    folder = root / "full"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    return str(folder)


def _folder(root: Path) -> str:
    folder = root / "folder"
    folder.mkdir()
    return str(folder)


def _missing(root: Path) -> str:
    return str(root / "missing.json")


UTF16 = '[{"prompt": "The {} is", "subject": "X", "target": "Y"}]'.encode("utf-16")
UTF32 = '{"layers": [6]}'.encode("utf-32")
GARBAGE = bytes(range(256)) * 4
BAD_UTF8 = b'[{"prompt": "The {} is \xc3\x28", "subject": "X", "target": "Y"}]'
GOOD = {"prompt": "The {} is located in", "subject": "Eiffel Tower", "target": "Rome"}
ROME_OK = {"layers": [6]}


@dataclass
class Probe:
    """``args`` of one ``factedit`` call; ``{path}`` in them is replaced by what ``setup(root)`` returns.
    ``expect``: substrings the error line must hold (the offending value or option, the rule).
    ``home``: a setup returning the FACTEDIT_HOME to use instead of the probe home."""

    id: str
    args: list[str]
    expect: tuple[str, ...]
    setup: Callable[[Path], str] | None = None
    home: Callable[[Path], str] | None = None
    model: bool = False  # refused only after the (cached) default model is loaded
    env: dict[str, str] = field(default_factory=dict)


def P(id: str, args: list[str], *expect: str, **kw) -> Probe:  # noqa: N802 - reads as a table
    return Probe(id, args, expect, **kw)


PROBES = [
    # -- request files ----------------------------------------------------------------------------------------------
    P(
        "requests-utf16",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "UTF-16",
        "requests.json",
        setup=_raw(UTF16, "requests.json"),
    ),
    P("requests-binary", ["edit", "--method", "memit", "--requests", "{path}"], "not UTF-8", setup=_raw(GARBAGE)),
    P(
        "requests-invalid-utf8",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "not UTF-8",
        "offset",
        setup=_raw(BAD_UTF8),
    ),
    P(
        "requests-invalid-json",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "not valid JSON",
        "line 1",
        setup=_raw(b'[{"prompt": 1,]'),
    ),
    P("requests-number", ["edit", "--method", "memit", "--requests", "{path}"], "a number", setup=_raw(b"42")),
    P("requests-null", ["edit", "--method", "memit", "--requests", "{path}"], "null", setup=_raw(b"null")),
    P("requests-string", ["edit", "--method", "memit", "--requests", "{path}"], "a string", setup=_raw(b'"text"')),
    P("requests-empty-list", ["edit", "--method", "memit", "--requests", "{path}"], "empty list", setup=_raw(b"[]")),
    P(
        "requests-list-of-numbers",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "request 0",
        "JSON object",
        setup=_requests([1, 2]),
    ),
    P(
        "requests-list-of-lists",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "request 0",
        "a list",
        setup=_requests([[GOOD]]),
    ),
    P(
        "requests-unknown-key",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "unknown key",
        "'taget'",
        setup=_requests([{**GOOD, "taget": "Rome"}]),
    ),
    P(
        "requests-unknown-rewrite-key",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "unknown key",
        "'subjct'",
        setup=_requests(
            [{"requested_rewrite": {"prompt": "{} is", "subject": "X", "subjct": "X", "target_new": {"str": "Y"}}}]
        ),
    ),
    P(
        "requests-rewrite-not-object",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "requested_rewrite",
        setup=_requests([{"requested_rewrite": "x"}]),
    ),
    P(
        "requests-target-number",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "'target' must be a string",
        setup=_requests([{**GOOD, "target": 5}]),
    ),
    P(
        "requests-two-targets",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "once",
        setup=_requests([{**GOOD, "target_new": "Lyon"}]),
    ),
    P(
        "requests-format-prompt",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "braces",
        setup=_requests([{**GOOD, "prompt": "The {} is in {0}"}]),
    ),
    P(
        "requests-target-is-true",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "true target already",
        setup=_requests([{**GOOD, "target_true": "Rome"}]),
    ),
    P(
        "requests-huge-subject",
        ["edit", "--method", "memit", "--requests", "{path}"],
        "40,000 characters",
        setup=_requests([{**GOOD, "subject": LONG, "prompt": "{} is"}]),
    ),
    P("requests-missing-file", ["edit", "--method", "memit", "--requests", "{path}"], "not found", setup=_missing),
    P("requests-folder", ["edit", "--method", "memit", "--requests", "{path}"], "is a folder", setup=_folder),
    P(
        "requests-and-prompt",
        ["edit", "--requests", "{path}", "--prompt", "The {} is"],
        "not both",
        setup=_requests([GOOD]),
    ),
    P(
        "requests-batch-for-rome",
        ["edit", "--method", "rome", "--requests", "{path}"],
        "one request at a time",
        setup=_requests([GOOD, {**GOOD, "subject": "Louvre"}]),
    ),
    # -- hyper-parameter files ---------------------------------------------------------------------------------------
    P(
        "hparams-utf16",
        [*EDIT, "--hparams", "{path}"],
        "UTF-16",
        "hparams.json",
        setup=_raw('{"layers": [6]}'.encode("utf-16"), "hparams.json"),
    ),
    P("hparams-utf32", [*EDIT, "--hparams", "{path}"], "UTF-16 (or UTF-32)", setup=_raw(UTF32, "hparams.json")),
    P("hparams-binary", [*EDIT, "--hparams", "{path}"], "not UTF-8", setup=_raw(GARBAGE, "hparams.json")),
    P(
        "hparams-invalid-json",
        [*EDIT, "--hparams", "{path}"],
        "not valid JSON",
        setup=_hparams_text('{"layers": [6],}'),
    ),
    P("hparams-list", [*EDIT, "--hparams", "{path}"], "JSON object", "not list", setup=_hparams([6])),
    P("hparams-number", [*EDIT, "--hparams", "{path}"], "JSON object", "not int", setup=_hparams(3)),
    P("hparams-null", [*EDIT, "--hparams", "{path}"], "JSON object", "not null", setup=_hparams(None)),
    P(
        "hparams-unknown-key",
        [*EDIT, "--hparams", "{path}"],
        "unknown key 'v_lrr'",
        setup=_hparams({**ROME_OK, "v_lrr": 0.5}),
    ),
    P(
        "hparams-infinity",
        [*EDIT, "--hparams", "{path}"],
        "v_weight_decay",
        "finite",
        setup=_hparams_text('{"layers": [6], "v_weight_decay": Infinity}'),
    ),
    P(
        "hparams-nan",
        [*EDIT, "--hparams", "{path}"],
        "v_lr",
        "finite",
        setup=_hparams_text('{"layers": [6], "v_lr": NaN}'),
    ),
    P("hparams-negative-lr", [*EDIT, "--hparams", "{path}"], "v_lr", setup=_hparams({**ROME_OK, "v_lr": -0.5})),
    P(
        "hparams-zero-steps",
        [*EDIT, "--hparams", "{path}"],
        "v_num_grad_steps",
        setup=_hparams({**ROME_OK, "v_num_grad_steps": 0}),
    ),
    P(
        "hparams-billion-steps",
        [*EDIT, "--hparams", "{path}"],
        "v_num_grad_steps 1000000000 is out of range",
        "[1, 1000]",
        setup=_hparams({**ROME_OK, "v_num_grad_steps": 10**9}),
    ),
    P(
        "hparams-zero-clamp",
        [*EDIT, "--hparams", "{path}"],
        "clamp_norm_factor",
        setup=_hparams({**ROME_OK, "clamp_norm_factor": 0}),
    ),
    P("hparams-negative-kl", [*EDIT, "--hparams", "{path}"], "kl_factor", setup=_hparams({**ROME_OK, "kl_factor": -1})),
    P(
        "hparams-huge-weight-decay",
        [*EDIT, "--hparams", "{path}"],
        "v_weight_decay 1e+300 is out of range",
        "[0, 100]",
        setup=_hparams({**ROME_OK, "v_weight_decay": 1e300}),
    ),
    P("hparams-string-number", [*EDIT, "--hparams", "{path}"], "v_lr", setup=_hparams({**ROME_OK, "v_lr": "fast"})),
    P("hparams-no-layers", [*EDIT, "--hparams", "{path}"], "'layers' is required", setup=_hparams({"v_lr": 0.5})),
    P("hparams-empty-layers", [*EDIT, "--hparams", "{path}"], "layers", setup=_hparams({"layers": []})),
    P("hparams-duplicate-layers", [*EDIT, "--hparams", "{path}"], "distinct", setup=_hparams({"layers": [6, 6]})),
    P(
        "hparams-negative-layer",
        [*EDIT, "--hparams", "{path}"],
        "layer -1 is out of range",
        setup=_hparams({"layers": [-1]}),
    ),
    P(
        "hparams-template-lengths",
        [*EDIT, "--hparams", "{path}"],
        "context_template_length_params",
        setup=_hparams({**ROME_OK, "context_template_length_params": [[5, 100000]]}),
    ),
    P(
        "hparams-short-documents",
        [*EDIT, "--hparams", "{path}"],
        "mom2_max_length",
        setup=_hparams({**ROME_OK, "mom2_max_length": 0}),
    ),
    P(
        "hparams-memit-negative-lambda",
        [*_edit(), "--method", "memit", "--hparams", "{path}"],
        "mom2_update_weight",
        setup=_hparams({"layers": [4, 5], "mom2_update_weight": -1}),
    ),
    P(
        "hparams-memit-zero-batch",
        [*_edit(), "--method", "memit", "--hparams", "{path}"],
        "batch_size",
        setup=_hparams({"layers": [4, 5], "batch_size": 0}),
    ),
    P(
        "hparams-alphaedit-zero-l2",
        [*_edit(), "--method", "alphaedit", "--hparams", "{path}"],
        "L2",
        setup=_hparams({"layers": [4, 5], "L2": 0}),
    ),
    P(
        "hparams-ft-huge-lr",
        [*_edit(), "--method", "ft", "--hparams", "{path}"],
        "lr 50.0 is out of range",
        "(0, 1]",
        setup=_hparams({"layers": [6], "lr": 50}),
    ),
    P(
        "hparams-ftl-zero-constraint",
        [*_edit(), "--method", "ft-l", "--hparams", "{path}"],
        "norm_constraint",
        setup=_hparams({"layers": [6], "norm_constraint": 0}),
    ),
    P(
        "hparams-ft-infinite-decay",
        [*_edit(), "--method", "ft", "--hparams", "{path}"],
        "weight_decay",
        setup=_hparams_text('{"layers": [6], "weight_decay": -Infinity}'),
    ),
    P(
        "hparams-for-method-none",
        [*_edit(), "--method", "none", "--hparams", "{path}"],
        "takes no hyper-parameters",
        setup=_hparams(ROME_OK),
    ),
    P("hparams-missing-file", [*EDIT, "--hparams", "{path}"], "not found", setup=_missing),
    P("hparams-folder", [*EDIT, "--hparams", "{path}"], "is a folder", setup=_folder),
    P(
        "hparams-one-token-statistics",
        [*EDIT, "--hparams", "{path}"],
        "mom2_n_tokens 1",
        "features",
        setup=_hparams({**ROME_OK, "mom2_n_tokens": 1}),
        model=True,
    ),
    # -- prompts, subjects, targets ----------------------------------------------------------------------------------
    P("prompt-positional-field", _edit("The {} is in {0}"), "braces", "{0}"),
    P("prompt-attribute-field", _edit("The {} is in {__class__}"), "braces", "__class__"),
    P("prompt-lone-open-brace", _edit("The {} is in {"), "braces"),
    P("prompt-lone-close-brace", _edit("The {} is in }"), "braces"),
    P("prompt-escaped-braces", _edit("The {} is {{x}}"), "braces", "{{x}}"),
    P("prompt-reversed-braces", _edit("The }{ is"), "exactly one"),
    P("prompt-two-slots", _edit("The {} and {} are in"), "exactly one", "found 2"),
    P("prompt-no-slot-no-subject", _edit("The tower is in"), "exactly one"),
    P("prompt-empty", _edit("   "), "prompt is empty"),
    P("prompt-huge", _edit("The {} " + LONG), "prompt is 40,00", "at most 2,000"),
    P("subject-empty", _edit(subject=" "), "subject is empty"),
    P("subject-with-braces", _edit(subject="Eiffel {} Tower"), "subject", "brace"),
    P("subject-huge", _edit(subject=LONG), "subject is 40,000 characters"),
    P("target-empty", _edit(target="  "), "target is empty"),
    P("target-huge", _edit(target=LONG), "target is 40,000 characters"),
    P(
        "target-equals-true-target",
        [*_edit(target="Paris"), "--true-target", "Paris"],
        "'Paris' is the true target already",
    ),
    P("target-is-current-answer", _edit(target="Paris"), "'Paris' is already the model's top prediction", model=True),
    P("paraphrase-empty", [*EDIT, "--paraphrase", " "], "paraphrase is empty"),
    P("neighbour-huge", [*EDIT, "--neighbour", LONG], "neighbour prompt is 40,000"),
    P("missing-target", ["edit", "--prompt", "The {} is", "--subject", "X"], "--target"),
    # -- other edit options ------------------------------------------------------------------------------------------
    P("method-unknown", [*EDIT, "--method", "bogus"], "unknown method 'bogus'"),
    P("batch-without-sequential", [*EDIT, "--batch", "2"], "--batch applies with --sequential"),
    P("sequential-batch-zero", [*EDIT, "--sequential", "--batch", "0"], "--batch"),
    P("sequential-batch-negative", [*EDIT, "--sequential", "--batch", "-1"], "--batch"),
    P("layer-negative", [*EDIT, "--layer", "-1"], "--layer -1"),
    P("layer-beyond-depth", [*EDIT, "--layer", "99"], "layer 99 is out of range", model=True),
    P("layer-not-a-number", [*EDIT, "--layer", "six"], "--layer"),
    P("stats-file-missing", [*EDIT, "--stats", "{path}"], "--stats", "not found", setup=_missing),
    P("stats-file-folder", [*EDIT, "--stats", "{path}"], "--stats", "is a folder", setup=_folder),
    P("corpus-missing", [*EDIT, "--corpus", "{path}"], "--corpus", "not found", setup=_missing),
    P("stats-corpus-missing", ["stats", "--layer", "6", "--corpus", "{path}"], "--corpus", "not found", setup=_missing),
    P(
        "eval-reference-corpus-missing",
        [
            "eval",
            "--method",
            "none",
            "--dataset",
            "counterfact",
            "--generation",
            "--reference-corpus",
            "{path}",
            "--out",
            "r",
        ],
        "--reference-corpus",
        setup=_missing,
    ),
    P("threads-zero", [*EDIT, "--threads", "0"], "--threads"),
    P("threads-absurd", [*EDIT, "--threads", "100000"], "--threads"),
    P("data-dir-missing", [*EDIT, "--data-dir", "{path}"], "does not exist", setup=_missing),
    P("layer-twice", [*EDIT, "--layer", "6", "--layer", "6"], "--layer 6 is given twice"),
    P("trace-seed-negative", [*TRACE, "--seed", "-1"], "--seed"),
    P("trace-seed-too-large", [*TRACE, "--seed", str(2**64)], "--seed"),
    P(
        "eval-seed-negative",
        ["eval", "--method", "none", "--dataset", "counterfact", "--seed", "-4", "--out", "r"],
        "--seed",
    ),
    # -- where results are written -----------------------------------------------------------------------------------
    P("save-is-file", [*EDIT, "--save", "{path}"], "--save", "is a file", setup=_file),
    P("save-inside-file", [*EDIT, "--save", "{path}"], "--save", "inside", setup=_inside_file),
    P("save-read-only", [*EDIT, "--save", "{path}"], "--save", "not writable", setup=_read_only),
    P("save-in-read-only", [*EDIT, "--save", "{path}"], "--save", "not writable", setup=_read_only_child),
    P("patch-apply-out-file", ["patch", "apply", "{path}", "--out", "{path}"], "--out", "is a file", setup=_file),
    P(
        "patch-apply-out-inside-file",
        ["patch", "apply", "x.safetensors", "--out", "{path}"],
        "--out",
        "inside",
        setup=_inside_file,
    ),
    P(
        "patch-apply-out-read-only",
        ["patch", "apply", "x.safetensors", "--out", "{path}"],
        "not writable",
        setup=_read_only_child,
    ),
    P(
        "patch-apply-out-not-empty",
        ["patch", "apply", "x.safetensors", "--out", "{path}"],
        "not empty",
        setup=_nonempty,
    ),
    P("patch-apply-missing-patch", ["patch", "apply", "{path}", "--out", "new"], "missing.json", setup=_missing),
    P(
        "patch-apply-garbage-patch",
        ["patch", "apply", "{path}", "--out", "new"],
        "bad.safetensors",
        setup=_raw(GARBAGE, "bad.safetensors"),
    ),
    P(
        "patch-revert-out-file",
        ["patch", "revert", "x.safetensors", "--model", "m", "--out", "{path}"],
        "--out",
        "is a file",
        setup=_file,
    ),
    P(
        "patch-revert-model-not-folder",
        ["patch", "revert", "x.safetensors", "--model", "{path}", "--out", "new"],
        "not a folder",
        setup=_missing,
    ),
    P(
        "patch-revert-foreign-folder",
        ["patch", "revert", "x.safetensors", "--model", "{path}", "--out", "new"],
        "was not written by",
        setup=_nonempty,
    ),
    P("patch-show-missing", ["patch", "show", "{path}"], "missing.json", setup=_missing),
    P(
        "eval-out-file",
        ["eval", "--method", "none", "--dataset", "counterfact", "--n", "1", "--out", "{path}"],
        "--out",
        "is a file",
        setup=_file,
    ),
    P(
        "eval-out-inside-file",
        ["eval", "--method", "none", "--dataset", "counterfact", "--out", "{path}"],
        "inside",
        setup=_inside_file,
    ),
    P(
        "eval-out-read-only",
        ["eval", "--method", "none", "--dataset", "counterfact", "--out", "{path}"],
        "not writable",
        setup=_read_only_child,
    ),
    P("trace-out-file", [*TRACE, "--out", "{path}"], "--out", "is a file", setup=_file),
    P("trace-dataset-out-file", ["trace-dataset", "--n", "1", "--out", "{path}"], "--out", "is a file", setup=_file),
    P("summarize-csv-folder", ["summarize", "{path}", "--csv", "{path}"], "--csv", "is a folder", setup=_folder),
    P(
        "summarize-plot-format",
        ["summarize", "{path}", "--plot", "{path}/plot.bmpx"],
        "unknown image format",
        setup=_folder,
    ),
    P("summarize-missing-run", ["summarize", "{path}"], "not found", setup=_missing),
    # -- the home folder ---------------------------------------------------------------------------------------------
    P("home-read-only", ["predict", "hello"], "FACTEDIT_HOME", "not writable", home=_read_only),
    P("home-is-file", ["predict", "hello"], "FACTEDIT_HOME", "is a file", home=_file),
    P("home-inside-file", EDIT, "FACTEDIT_HOME", "inside", home=_inside_file),
    P("home-read-only-for-stats", ["stats", "--layer", "6"], "FACTEDIT_HOME", home=_read_only),
    P(
        "home-read-only-for-eval",
        ["eval", "--method", "none", "--dataset", "counterfact", "--out", "run"],
        "FACTEDIT_HOME",
        home=_read_only,
    ),
    P("home-read-only-for-trace", [*TRACE, "--out", "t"], "FACTEDIT_HOME", home=_read_only),
    # -- predict and generate ----------------------------------------------------------------------------------------
    P("predict-k-negative", ["predict", "--k", "-1", "hello"], "--k"),
    P("predict-k-zero", ["predict", "--k", "0", "hello"], "--k"),
    P("predict-k-above-vocabulary", ["predict", "--k", "1000000", "hello"], "k must be", "vocabulary", model=True),
    P("predict-empty-text", ["predict", ""], "text is empty"),
    P("predict-blank-text", ["predict", "hello", "   "], "text is empty"),
    P("predict-huge-text", ["predict", LONG], "text is 40,000 characters"),
    P("predict-patch-missing", ["predict", "hello", "--patch", "{path}"], "--patch", "not found", setup=_missing),
    P("generate-empty-text", ["generate", ""], "text is empty"),
    P("generate-negative-tokens", ["generate", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    P("generate-absurd-tokens", ["generate", "hi", "--max-new-tokens", "100000000"], "--max-new-tokens", "at most"),
    P("generate-negative-seed", ["generate", "hi", "--sample", "--seed", "-1"], "--seed"),
    # -- statistics --------------------------------------------------------------------------------------------------
    P("stats-tokens-zero", ["stats", "--layer", "6", "--tokens", "0"], "--tokens"),
    P("stats-tokens-negative", ["stats", "--layer", "6", "--tokens", "-5"], "--tokens"),
    P("stats-tokens-below-features", ["stats", "--layer", "6", "--tokens", "5"], "--tokens 5", "features", model=True),
    P("stats-layer-negative", ["stats", "--layer", "-1"], "--layer -1"),
    P("stats-accumulate-float16", ["stats", "--layer", "6", "--accumulate", "float16"], "--accumulate"),
    P("stats-max-length-zero", ["stats", "--layer", "6", "--max-length", "0"], "--max-length"),
    # -- evaluation --------------------------------------------------------------------------------------------------
    P("eval-n-zero", ["eval", "--method", "none", "--dataset", "counterfact", "--n", "0", "--out", "run"], "--n"),
    P("eval-n-negative", ["eval", "--method", "none", "--dataset", "counterfact", "--n", "-3", "--out", "run"], "--n"),
    P(
        "eval-start-negative",
        ["eval", "--method", "none", "--dataset", "counterfact", "--start", "-1", "--out", "run"],
        "--start",
    ),
    P(
        "eval-batch-zero",
        ["eval", "--method", "memit", "--dataset", "counterfact", "--batch", "0", "--out", "run"],
        "--batch",
    ),
    P(
        "eval-group-zero",
        ["eval", "--method", "ft", "--dataset", "counterfact", "--group", "0", "--out", "run"],
        "--group",
    ),
    P(
        "eval-unknown-dataset",
        ["eval", "--method", "none", "--dataset", "wiki", "--out", "run"],
        "unknown dataset 'wiki'",
    ),
    P(
        "eval-unknown-method",
        ["eval", "--method", "bogus", "--dataset", "counterfact", "--out", "run"],
        "unknown method",
    ),
    P(
        "eval-zsre-target",
        ["eval", "--method", "none", "--dataset", "zsre", "--zsre-target", "both", "--out", "run"],
        "zsRE target",
    ),
    P(
        "eval-zsre-generation",
        ["eval", "--method", "none", "--dataset", "zsre", "--generation", "--out", "run"],
        "CounterFact only",
    ),
    P(
        "eval-drift-not-sequential",
        ["eval", "--method", "rome", "--dataset", "counterfact", "--drift-every", "2", "--out", "run"],
        "sequential",
    ),
    P(
        "eval-hparams-utf16",
        ["eval", "--method", "rome", "--dataset", "counterfact", "--hparams", "{path}", "--out", "run"],
        "UTF-16",
        setup=_raw('{"layers": [6]}'.encode("utf-16"), "hp.json"),
    ),
    P(
        "eval-hparams-infinite",
        ["eval", "--method", "rome", "--dataset", "counterfact", "--hparams", "{path}", "--out", "run"],
        "finite",
        setup=_hparams_text('{"layers": [6], "kl_factor": Infinity}'),
    ),
    P(
        "eval-data-missing",
        ["eval", "--method", "none", "--dataset", "counterfact", "--data", "{path}", "--out", "run"],
        "not found",
        setup=_missing,
    ),
    P(
        "eval-pre-from-missing",
        ["eval", "--method", "rome", "--dataset", "counterfact", "--pre-from", "{path}", "--out", "run"],
        "pre_from",
        setup=_missing,
    ),
    P(
        "eval-layer-negative",
        ["eval", "--method", "rome", "--dataset", "counterfact", "--layer", "-2", "--out", "run"],
        "--layer -2",
    ),
    P(
        "eval-max-out-len-absurd",
        ["eval", "--method", "none", "--dataset", "counterfact", "--max-out-len", "10000000", "--out", "run"],
        "max_out_len",
    ),
    # -- causal tracing ----------------------------------------------------------------------------------------------
    P("trace-samples-zero", [*TRACE, "--samples", "0"], "--samples"),
    P("trace-samples-absurd", [*TRACE, "--samples", "1000000"], "samples must be"),
    P("trace-window-zero", [*TRACE, "--window", "0"], "--window"),
    P("trace-noise-negative", [*TRACE, "--noise", "-1"], "noise scale"),
    P("trace-noise-nan", [*TRACE, "--noise", "nan"], "noise scale"),
    P("trace-noise-infinite", [*TRACE, "--noise", "inf"], "noise scale"),
    P("trace-noise-factor-zero", [*TRACE, "--noise-factor", "0"], "noise factor"),
    P("trace-kind-unknown", [*TRACE, "--kind", "bogus"], "--kind 'bogus'"),
    P("trace-format-unknown", [*TRACE, "--formats", "bmp"], "figure format"),
    P("trace-method-unknown", [*TRACE, "--method", "slow"], "unknown method 'slow'"),
    P("trace-autocast-unknown", [*TRACE, "--autocast", "int8"], "autocast"),
    P("trace-batch-zero", [*TRACE, "--batch-size", "0"], "--batch-size"),
    P(
        "trace-subject-not-in-prompt",
        ["trace", "--prompt", "The tower is in", "--subject", "Space Needle"],
        "does not occur",
    ),
    P("trace-prompt-braces", ["trace", "--prompt", "The {} is in {0}", "--subject", "Space Needle"], "braces"),
    P("trace-answer-blank", [*TRACE, "--answer", " "], "--answer is empty"),
    P("trace-dataset-n-zero", ["trace-dataset", "--n", "0"], "--n"),
    P("trace-dataset-n-negative", ["trace-dataset", "--n", "-2"], "--n"),
    P("trace-dataset-samples-zero", ["trace-dataset", "--samples", "0"], "--samples"),
    P("trace-dataset-data-missing", ["trace-dataset", "--data", "{path}"], "--data", "not found", setup=_missing),
    P(
        "trace-dataset-summarize-nothing",
        ["trace-dataset", "--summarize-only", "--out", "{path}"],
        "holds no traced facts",
        setup=_folder,
    ),
    # -- the command line itself -------------------------------------------------------------------------------------
    P("unknown-command", ["editt"], "No such command"),
    P("unknown-option", ["predict", "--kk", "3", "hi"], "No such option"),
]


def test_probe_ids_are_unique_and_many():
    ids = [p.id for p in PROBES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 70


# -- the harness ------------------------------------------------------------------------------------------------------
def _listing(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (symbolic links not followed): kind, size and modification time of files."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            key = str(path.relative_to(root))
            out[key] = ("dir",) if stat.S_ISDIR(st.st_mode) else (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def homes(default_model, tmp_path_factory):
    """A private home whose ``models`` is the real home's (the converted default model, no conversion), and
    that model's folder, whose files must not change."""
    from factedit.models.registry import DEFAULT_MODEL
    from factedit.paths import factedit_home

    real_models = factedit_home() / "models"
    home = tmp_path_factory.mktemp("probe-home")
    (home / "models").symlink_to(real_models, target_is_directory=True)
    model_folder = real_models / DEFAULT_MODEL
    return home, model_folder if model_folder.is_dir() else real_models


def _unlock(root: Path) -> None:
    for folder, dirs, _ in os.walk(root):
        for name in dirs:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(0o755)


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_probe(probe: Probe, homes, tmp_path, monkeypatch):
    home, model_folder = homes
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative outputs (trace/, run/, new/) would land here
    value = probe.setup(work) if probe.setup else ""
    env = {"FACTEDIT_HOME": probe.home(work) if probe.home else str(home), **probe.env}
    args = [a.replace("{path}", value) for a in probe.args]
    watched = {"work": work, "home": home, "model": model_folder}
    before = {name: _listing(root) for name, root in watched.items()}
    try:
        result = CliRunner().invoke(app, args, env=env)
    finally:
        after = {name: _listing(root) for name, root in watched.items()}
        _unlock(work)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr[-2000:], result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.output
    for part in probe.expect:
        assert part in lines[0], (part, lines[0][:500])
    assert result.stdout == ""
    for name in watched:
        assert after[name] == before[name], f"{name} changed: {set(after[name]) ^ set(before[name])}"


# -- on a pipe: one line, whatever the width -----------------------------------------------------------------------
SCRIPT = Path(sys.executable).with_name("factedit")
FACTEDIT = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-c", "from factedit.cli.main import app; app()"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["edit", "--method", "memit", "--requests", "requests.json"], "UTF-16"),  # a FactEditError
        (["edit", "--data-dir", "missing/" + "a-long-folder-name/" * 8], "does not exist"),  # a usage error
    ],
    ids=["pipe-utf16-requests", "pipe-long-usage-error"],
)
def test_error_is_one_line_on_a_narrow_pipe(args, expect, tmp_path):
    (tmp_path / "requests.json").write_bytes(UTF16)
    env = {**os.environ, "COLUMNS": "40", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*FACTEDIT, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr
    assert len(lines[0]) > 40 and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.json"]
