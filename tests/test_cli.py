"""The command line as a user drives it: the real ``factedit`` entry point, real stdout/stderr pipes
(not a terminal, as under CI or ``> out.txt``), the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factedit.cli.main import app
from factedit.cli.render import METHOD_CHOICES

from .conftest import shared_data

EIFFEL = ["--prompt", "The {} is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome"]
SCRIPT = Path(sys.executable).with_name("factedit")  # the installed console script
FACTEDIT = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-c", "from factedit.cli.main import app; app()"]


def factedit(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process with stdout and stderr captured through pipes."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*FACTEDIT, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    return result.output


# -- start-up and help -------------------------------------------------------------------------------------------
def test_help_imports_neither_torch_nor_transformers():
    """``--help`` of every command is instant because nothing heavy is imported before a command runs."""
    probe = "\n".join(
        [
            "import sys",
            "from factedit.cli.main import app",
            "for cmd in ([], ['edit'], ['eval'], ['trace'], ['serve'], ['patch', 'apply']):",
            "    try:",
            "        app([*cmd, '--help'], prog_name='factedit')",
            "    except SystemExit as exc:",
            "        assert exc.code == 0, cmd",
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)",
            "assert not heavy, heavy",
        ]
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: factedit edit" in result.stdout


def test_edit_and_eval_offer_exactly_the_registered_methods():
    from factedit.editing.methods import method_names

    assert list(METHOD_CHOICES) == method_names()
    for command in ("edit", "eval"):
        text = " ".join(_help(command).split())
        listed = text.split("editing method: ", 1)[1]
        assert listed.startswith(", ".join(method_names())), (command, listed[:120])


def test_every_option_has_help_and_no_bool_metavars():
    commands = [
        [],
        ["edit"],
        ["predict"],
        ["generate"],
        ["stats"],
        ["trace"],
        ["trace-dataset"],
        ["eval"],
        ["summarize"],
        ["serve"],
    ]
    for command in commands:
        text = _help(*command)
        assert "<bool>" not in text and "--no-no-" not in text, command
        lines = text.splitlines()
        options = [i for i, line in enumerate(lines) if line.strip().startswith("-")]
        assert options, command
        for i in options:  # "  --flag METAVAR   help text": a help text beside every option (or, for a long
            line = lines[i]  # option name, on the next line, indented further)
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            beside = len(line.strip().split("  ")) >= 2 or line.rstrip().endswith(("]",))
            below = bool(nxt.strip()) and not nxt.strip().startswith("-") and len(nxt) - len(nxt.lstrip()) > 4
            assert beside or below, (command, line)
    assert "--pre / --no-pre" in _help("summarize")
    for command in ("edit", "predict", "generate", "stats", "trace", "trace-dataset", "eval", "serve"):
        assert "--threads N" in _help(command), command


# -- errors: one line on stderr, exit status 2 ---------------------------------------------------------------------
# Each case runs in a fresh process on a real pipe, except those marked IN_PROCESS: they fail only after
# torch and transformers are imported (6-7 s a process here), so they run through typer's runner, whose
# stderr is no terminal either; the missing --subject case keeps that late failure on a real pipe. An
# unknown method fails before torch is imported (check_method_name), so both its cases are cheap.
IN_PROCESS, ON_A_PIPE = True, False


@pytest.mark.parametrize(
    ("args", "message", "in_process"),
    [
        (["edit", *EIFFEL, "--method", "bogus"], "error: unknown method 'bogus'", ON_A_PIPE),
        (
            ["edit", "--prompt", "The {} is located in", "--target", "Rome"],
            "error: --prompt, --subject and --target",
            ON_A_PIPE,
        ),
        (["edit", *EIFFEL, "--layer", "six"], "error: Invalid value for '--layer'", ON_A_PIPE),
        (["trace", "--prompt", "The Eiffel Tower is in"], "error: Missing option '--subject'", ON_A_PIPE),
        (
            ["eval", "--method", "bogus", "--dataset", "counterfact", "--out", "x"],
            "error: unknown method 'bogus'",
            ON_A_PIPE,
        ),
        (["edit", *EIFFEL, "--data-dir", "/no/such/folder"], "does not exist", ON_A_PIPE),
        (
            ["eval", "--method", "rome", "--dataset", "counterfact", "--out", "x", "--set", "key_avg=1"],
            "no hyper-parameter",
            IN_PROCESS,
        ),
        (
            ["eval", "--method", "rome", "--dataset", "counterfact", "--out", "x", "--set", "oops"],
            "expected KEY=VALUE",
            IN_PROCESS,
        ),
        (
            ["eval", "--method", "rome", "--dataset", "counterfact", "--out", "x", "--prompts-eval", "md"],
            "prompts_eval",
            IN_PROCESS,
        ),
        (["predict", "--device-map", "missing.json", "hi"], "device map file missing.json not found", IN_PROCESS),
        (["locate", "--out", "x", "--radius", "40"], "Invalid value for '--radius'", ON_A_PIPE),
    ],
)
def test_errors_are_one_line_on_a_pipe(args, message, in_process, tmp_path, monkeypatch):
    if in_process:
        monkeypatch.chdir(tmp_path)
        ran = CliRunner().invoke(app, args)
        code, stdout, stderr = ran.exit_code, ran.stdout, ran.stderr
    else:
        ran = factedit(*args, cwd=tmp_path)
        code, stdout, stderr = ran.returncode, ran.stdout, ran.stderr
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert stdout == "" and not list(tmp_path.iterdir())


# -- -v anywhere ------------------------------------------------------------------------------------------------------
def test_verbose_before_or_after_the_command(tmp_path):
    """Without it no INFO lines: test_piped_edit_table_has_every_column_and_the_verdict checks that."""
    prompt = "The Eiffel Tower is located in the city of"
    after = factedit("predict", prompt, "--k", "1", "--threads", "1", "-v", cwd=tmp_path)
    before = factedit("--verbose", "predict", prompt, "--k", "1", "--threads", "1", cwd=tmp_path)
    for result in (after, before):
        assert result.returncode == 0, result.stderr
        assert "' Paris'" in result.stdout
    for result in (after, before):
        assert "INFO factedit.cli: torch CPU threads: 1" in result.stderr, result.stderr


# -- output on a pipe ---------------------------------------------------------------------------------------------
def test_piped_edit_table_has_every_column_and_the_verdict(tmp_path):
    """``factedit edit ... > out.txt`` under a narrow COLUMNS: the after columns are there, not cropped."""
    # ROME's defaults at layer 6, statistics from a smaller sample, 8 value steps (CI time; Rome at p = 0.97)
    hparams = tmp_path / "rome.json"
    hparams.write_text(json.dumps({"layers": [6], "mom2_n_tokens": 10_000, "v_num_grad_steps": 8}))
    result = factedit(
        "edit",
        *EIFFEL,
        "--neighbour",
        "The Louvre is located in the city of",
        "--hparams",
        str(hparams),
        "--threads",
        "1",
        cwd=tmp_path,
        env={"COLUMNS": "60"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for header in (
        "prompt",
        "before: top-5 next tokens",
        "before: p(new) / p(true)",
        "after: top-5 next tokens",
        "after: p(new) / p(true)",
    ):
        assert header in out, header
    header_line = next(line for line in out.splitlines() if "after: p(new) / p(true)" in line)
    assert header_line.count("┃") == 6  # five columns, none cropped
    prompt_line = next(line for line in out.splitlines() if "[prompt]" in line)
    cells = [c.strip() for c in prompt_line.split("│")[1:-1]]
    assert cells[1].startswith("' Paris'") and cells[3].startswith("' Rome'")
    p_new_before, p_new_after = (float(cells[i].split(" / ")[0]) for i in (2, 4))
    assert p_new_after > p_new_before
    assert "the new target ' Rome' is now the top prediction" in out.splitlines()[-1]
    assert "value optimisation" in result.stderr  # progress goes to stderr
    assert "INFO" not in result.stderr  # no log lines without --verbose


def test_json_edit_with_another_method_keeps_progress_on_stderr(tmp_path):
    """Every registered method works in ``edit``; ``--json`` prints one JSON object and still shows progress."""
    result = factedit(
        "edit", *EIFFEL, "--method", "ft", "--json", "--save", str(tmp_path / "patch"), "--threads", "1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["method"] == "ft" and out["request"]["subject"] == "Eiffel Tower"
    assert {
        "before",
        "after",
        "requests",
        "layers",
        "edit_seconds",
        "timings",
        "drift",
        "patch",
        "converged",
        "landed",
    } <= set(out)
    assert out["after"][0]["p_target_new"] > out["before"][0]["p_target_new"]
    assert Path(out["patch"]).is_file()
    assert "ft" in result.stderr and "step" in result.stderr  # the fine-tuning progress bar


# -- the data folder ---------------------------------------------------------------------------------------------
def test_data_dir_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from factedit import paths

    monkeypatch.chdir(tmp_path)
    (tmp_path.parent / "shared" / "data").mkdir(parents=True, exist_ok=True)  # the old cwd-relative trap
    monkeypatch.delenv("FACTEDIT_DATA_DIR", raising=False)
    try:
        assert paths.data_dir() == paths.development_data_dir()
        assert paths.data_dir() != (tmp_path.parent / "shared" / "data")
        monkeypatch.setenv("FACTEDIT_DATA_DIR", str(tmp_path))
        assert paths.data_dir() == tmp_path
        other = tmp_path / "other"
        other.mkdir()
        paths.set_data_dir(other)
        assert paths.data_dir() == other.resolve()  # --data-dir beats the environment
    finally:
        paths.set_data_dir(None)


def test_eval_reads_the_data_folder_given_from_any_working_directory(tmp_path):
    data = shared_data()
    if not (data / "counterfact").is_dir():
        pytest.skip(f"no CounterFact data in {data}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = factedit(
        "eval",
        "--method",
        "none",
        "--dataset",
        "counterfact",
        "--n",
        "1",
        "--no-generative",
        "--out",
        "run",
        "-v",
        "--data-dir",
        str(data),
        "--threads",
        "1",
        cwd=elsewhere,
        env={"FACTEDIT_DATA_DIR": str(tmp_path / "not-here")},
    )
    assert result.returncode == 0, result.stderr
    assert f"data folder: {data.resolve()} (from --data-dir)" in result.stderr
    assert "1/1 cases" in result.stdout
    manifest = json.loads((elsewhere / "run" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "smollm2-135m"  # the model actually used, the default here
