"""``factedit eval`` (resumable CounterFact/zsRE runs) and ``factedit summarize`` (comparison tables)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from factedit.errors import FactEditError

console = Console()
err = Console(stderr=True)
log = logging.getLogger("factedit")


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def eval_command(
    method: Annotated[str, typer.Option(help="rome, memit, alphaedit, ft, ft-l or none (the unedited model)")],
    dataset: Annotated[str, typer.Option(help="counterfact or zsre")],
    out: Annotated[Path, typer.Option(help="run folder (re-run the same command to resume)")],
    n: Annotated[Optional[int], typer.Option(help="number of cases (default: all); may grow on resume")] = None,
    start: Annotated[int, typer.Option(help="skip this many valid records first")] = 0,
    data: Annotated[Optional[Path], typer.Option(help="data file or folder (default: $FACTEDIT_DATA_DIR)")] = None,
    download: Annotated[bool, typer.Option(help="download the official file if it is not found locally")] = False,
    zsre_target: Annotated[str, typer.Option(help="zsRE new target: answers (ROME/MEMIT) or alt (MEND)")] = "answers",
    hparams: Annotated[Optional[Path], typer.Option(help="hyper-parameter JSON (default: family defaults)")] = None,
    layer: Annotated[Optional[list[int]], typer.Option(help="override the edited layer(s)")] = None,
    generation: Annotated[bool, typer.Option(help="also fluency (GE) and consistency (RS): slow")] = False,
    n_gen: Annotated[Optional[int], typer.Option(help="generation prompts per case (default: all, as ROME)")] = None,
    gen_cases: Annotated[Optional[int], typer.Option(
        help="generation metrics on the first this many cases only (default: all)")] = None,
    max_out_len: Annotated[int, typer.Option(help="generated text length in tokens, prompt included")] = 100,
    seed: Annotated[int, typer.Option(help="seed of the generation samples")] = 0,
    reference_corpus: Annotated[Optional[str], typer.Option(help="corpus for reference texts and IDF")] = None,
    batch: Annotated[Optional[int], typer.Option(
        help="edit this many cases at once from the unedited model (MEMIT's protocol; with --sequential: per step)")] = None,
    sequential: Annotated[bool, typer.Option(
        help="keep every edit: steps of --batch cases (default 1) applied one after another")] = False,
    drift_every: Annotated[Optional[int], typer.Option(
        help="with --sequential: every k steps, measure how many earlier edits hold (drift.jsonl)")] = None,
    pre_from: Annotated[Optional[Path], typer.Option(
        help="reuse the unedited scores of another run of the same model and data")] = None,
    group: Annotated[int, typer.Option(
        help="compute this many cases' independent edits together (FT, FT-L: faster on CPU; each case is "
             "still edited alone from the unedited model, results equal up to float rounding)")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (1 is fastest on a busy machine)")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="registry name, .gguf, folder, hub id")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Edit each case from the unedited model, evaluate, revert; one JSON line per case in OUT/cases.jsonl."""
    import torch

    from factedit.evaluation.runner import RunConfig, run_evaluation
    from factedit.models import load_model

    if threads:
        torch.set_num_threads(threads)
    try:
        config = RunConfig(method=method, dataset=dataset, n=n, start=start,
                           data_path=str(data) if data else None, download=download, zsre_target=zsre_target,
                           hparams=str(hparams) if hparams else None,
                           overrides={"layers": layer} if layer else {}, generation=generation, n_gen=n_gen,
                           max_out_len=max_out_len, seed=seed, reference_corpus=reference_corpus,
                           gen_cases=gen_cases, batch=batch, sequential=sequential, drift_every=drift_every,
                           pre_from=str(pre_from) if pre_from else None, group=group)
        mdl, tok = load_model(model, device=device, dtype=dtype)
        report = run_evaluation(mdl, tok, config, out, model_name=model or "smollm2-135m")
    except FactEditError as exc:
        _fail(exc)
    console.print(f"{report.out_dir}: {report.already_done + report.evaluated}/{report.total} cases "
                  f"({report.evaluated} now, {report.errors} failed edits) in {report.seconds:.0f}s", highlight=False)


def summarize_command(
    runs: Annotated[list[Path], typer.Argument(help="run folders written by 'factedit eval'")],
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or both")] = "markdown",
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="also write the CSV table here")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="draw a bar plot (PNG/PDF) here")] = None,
    all_cases: Annotated[bool, typer.Option(help="use every run's own cases, not only the common ones")] = False,
    no_pre: Annotated[bool, typer.Option(help="leave out the unedited model's row")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Side-by-side table of runs: mean ± 95% CI of every metric and of S."""
    from dataclasses import asdict

    from factedit.evaluation.summary import plot, summarize_runs, to_csv, to_markdown

    if fmt not in ("markdown", "csv", "both"):
        _fail(FactEditError("--format must be markdown, csv or both"))
    try:
        summary = summarize_runs(runs, common=not all_cases, pre=not no_pre)
        if as_json:
            typer.echo(json.dumps(asdict(summary), indent=1))
        else:
            if fmt in ("markdown", "both"):
                typer.echo(to_markdown(summary))
            if fmt in ("csv", "both"):
                typer.echo(to_csv(summary))
        if csv_out:
            csv_out.parent.mkdir(parents=True, exist_ok=True)
            csv_out.write_text(to_csv(summary))
        if plot_out:
            console.print(f"plot written to {plot(summary, plot_out)}", highlight=False)
    except FactEditError as exc:
        _fail(exc)


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``summarize`` to the ``factedit`` command."""
    app.command("eval")(eval_command)
    app.command("summarize")(summarize_command)
