"""``factedit eval`` (resumable CounterFact/zsRE runs) and ``factedit summarize`` (comparison tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from factedit.cli.options import (
    ChatOpt,
    DataDirOpt,
    JsonOpt,
    ModelChoice,
    check_corpus,
    console,
    fail,
    parse_counts,
    parse_overrides,
    progress,
    with_model_options,
)
from factedit.cli.render import METHOD_CHOICES, check_method_name
from factedit.errors import FactEditError


@with_model_options
def eval_command(
    method: Annotated[
        str,
        typer.Option(help=f"editing method: {', '.join(METHOD_CHOICES)} (none: the unedited model)", metavar="NAME"),
    ],
    dataset: Annotated[str, typer.Option(help="counterfact or zsre", metavar="NAME")],
    out: Annotated[Path, typer.Option(help="run folder (re-run the same command to resume)", metavar="DIR")],
    n: Annotated[
        Optional[int], typer.Option(help="number of cases (default: all); may grow on resume", min=1, metavar="N")
    ] = None,
    start: Annotated[int, typer.Option(help="skip this many valid records first", min=0, metavar="N")] = 0,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="the dataset file or a folder holding it (default: the data folder, see --data-dir)", metavar="PATH"
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="download the official file if it is not found locally")
    ] = False,
    zsre_target: Annotated[
        str, typer.Option(help="zsRE new target: answers (ROME/MEMIT) or alt (MEND)", metavar="KIND")
    ] = "answers",
    hparams: Annotated[
        Optional[Path],
        typer.Option(help="hyper-parameter JSON (default: the method's file for the model family)", metavar="FILE"),
    ] = None,
    layer: Annotated[
        Optional[list[int]], typer.Option(help="override the edited layer(s) (repeatable)", metavar="N")
    ] = None,
    setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="override one hyper-parameter, KEY=VALUE with VALUE as JSON or a plain string (repeatable), "
            "e.g. --set key_average=context_types",
            metavar="KEY=VALUE",
        ),
    ] = None,
    generation: Annotated[
        bool, typer.Option("--generation", help="also fluency (GE) and consistency (RS): slow")
    ] = False,
    n_gen: Annotated[
        Optional[int], typer.Option(help="generation prompts per case (default: all, as ROME)", min=1, metavar="N")
    ] = None,
    gen_cases: Annotated[
        Optional[int],
        typer.Option(help="generation metrics on the first this many cases only (default: all)", min=1, metavar="N"),
    ] = None,
    max_out_len: Annotated[
        int, typer.Option(help="generated text length in tokens, prompt included", min=1, metavar="N")
    ] = 100,
    seed: Annotated[int, typer.Option(help="seed of the generation samples", min=0, max=2**63 - 1, metavar="N")] = 0,
    reference_corpus: Annotated[
        Optional[str],
        typer.Option(help="corpus for the reference texts and IDF of the consistency score", metavar="SPEC"),
    ] = None,
    batch: Annotated[
        Optional[int],
        typer.Option(
            help="edit this many cases at once from the unedited model (MEMIT's protocol; with --sequential: per step)",
            min=1,
            metavar="N",
        ),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential", help="keep every edit: steps of --batch cases (default 1) applied one after another"
        ),
    ] = False,
    drift_every: Annotated[
        Optional[int],
        typer.Option(
            help="with --sequential: every k steps, measure how many earlier edits hold (drift.jsonl)",
            min=1,
            metavar="K",
        ),
    ] = None,
    drift_at: Annotated[
        Optional[str],
        typer.Option(
            help="with --sequential: also measure once this many edits are in the model, e.g. 10,100,1000",
            metavar="N,N,...",
        ),
    ] = None,
    drift_cases: Annotated[
        int,
        typer.Option(help="a drift point measures the first N edited cases (the oldest edits)", min=1, metavar="N"),
    ] = 200,
    pre_from: Annotated[
        Optional[Path],
        typer.Option(help="reuse the unedited scores of another run of the same model and data", metavar="DIR"),
    ] = None,
    group: Annotated[
        int,
        typer.Option(
            help="compute this many cases' independent edits together (FT, FT-L: faster on CPU; each case is "
            "still edited alone from the unedited model, results equal up to float rounding)",
            min=1,
            metavar="N",
        ),
    ] = 1,
    generative: Annotated[
        bool,
        typer.Option(
            "--generative/--no-generative",
            help="WILD's generative metrics (greedy answers, no teacher forcing): Gen ES/PS/NS; about as slow again "
            "as the teacher-forced metrics",
        ),
    ] = True,
    answer_tokens: Annotated[
        int, typer.Option(help="token budget of a greedy answer (WILD: 50)", min=1, max=512, metavar="N")
    ] = 50,
    capability: Annotated[
        bool,
        typer.Option(
            "--capability",
            help="with --batch or --sequential: perplexity (WikiText-2, held-out Wikipedia), known-fact accuracy "
            "and generation entropy before/after editing and at drift points (capability.jsonl, drift.jsonl)",
        ),
    ] = False,
    capability_windows: Annotated[
        int, typer.Option(help="perplexity windows of 256 tokens per text", min=1, metavar="N")
    ] = 8,
    capability_facts: Annotated[
        int, typer.Option(help="known facts (of those the unedited model predicts)", min=1, metavar="N")
    ] = 200,
    capability_prompts: Annotated[int, typer.Option(help="fluency samples", min=1, metavar="N")] = 10,
    guard: Annotated[
        bool,
        typer.Option(
            "--guard",
            help="with --sequential: after each edit, probe neighbourhood prompts, unrelated known facts and "
            "held-out perplexity; roll back (bit-exact) and record as refused an edit that crosses a limit",
        ),
    ] = False,
    guard_max_neighbour_drop: Annotated[
        Optional[float],
        typer.Option(help="refuse an edit losing more than this share of probe neighbours (default 0.05)", metavar="X"),
    ] = None,
    guard_max_known_drop: Annotated[
        Optional[float],
        typer.Option(help="refuse an edit losing more than this share of known facts (default 0.04)", metavar="X"),
    ] = None,
    guard_max_ppl_rise: Annotated[
        Optional[float],
        typer.Option(
            help="refuse an edit raising held-out perplexity by more than this (default 0.02 = 2%)", metavar="X"
        ),
    ] = None,
    guard_max_total_neighbour_drop: Annotated[
        Optional[float], typer.Option(help="the same since the unedited model (default 0.10)", metavar="X")
    ] = None,
    guard_max_total_known_drop: Annotated[
        Optional[float], typer.Option(help="the same since the unedited model (default 0.10)", metavar="X")
    ] = None,
    guard_max_total_ppl_rise: Annotated[
        Optional[float], typer.Option(help="the same since the unedited model (default 0.10)", metavar="X")
    ] = None,
    guard_cases: Annotated[
        Optional[int],
        typer.Option(help="cases whose neighbour prompts the guard probes (default 20)", min=0, metavar="N"),
    ] = None,
    guard_facts: Annotated[
        Optional[int], typer.Option(help="known facts the guard probes (default 50)", min=1, metavar="N")
    ] = None,
    chat: ChatOpt = False,
    prompts_edit: Annotated[
        Optional[str],
        typer.Option(help="raw or chat: the prompts edits are made on (overrides --chat)", metavar="FMT"),
    ] = None,
    prompts_eval: Annotated[
        Optional[str],
        typer.Option(help="raw or chat: the prompts the evaluation scores (overrides --chat)", metavar="FMT"),
    ] = None,
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Edit each case from the unedited model, evaluate, revert; one JSON line per case in OUT/cases.jsonl."""
    check_method_name(method)
    from factedit.editing.methods import get_method
    from factedit.evaluation.runner import RunConfig, run_evaluation
    from factedit.paths import check_output_path

    try:  # settings, hyper-parameters, data paths and the run folder are checked before the model is loaded
        edit_method = get_method(method)
        if hparams is not None:
            edit_method.check_source(hparams)
        if any(x < 0 for x in layer or []):
            raise FactEditError(f"--layer {min(layer)} is out of range: layers are numbered from 0")
        config = RunConfig(
            method=method,
            dataset=dataset,
            n=n,
            start=start,
            data_path=str(data) if data else None,
            download=download,
            zsre_target=zsre_target,
            hparams=str(hparams) if hparams else None,
            overrides={**parse_overrides(setting or []), **({"layers": layer} if layer else {})},
            generation=generation,
            n_gen=n_gen,
            max_out_len=max_out_len,
            seed=seed,
            reference_corpus=reference_corpus,
            gen_cases=gen_cases,
            batch=batch,
            sequential=sequential,
            drift_every=drift_every,
            drift_at=parse_counts(drift_at, "--drift-at"),
            drift_cases=drift_cases,
            pre_from=str(pre_from) if pre_from else None,
            group=group,
            generative=generative,
            answer_tokens=answer_tokens,
            capability=capability,
            capability_windows=capability_windows,
            capability_facts=capability_facts,
            capability_prompts=capability_prompts,
            prompts_edit=prompts_edit or ("chat" if chat else "raw"),
            prompts_eval=prompts_eval or ("chat" if chat else "raw"),
            guard=_guard_settings(
                guard,
                max_neighbour_drop=guard_max_neighbour_drop,
                max_known_drop=guard_max_known_drop,
                max_ppl_rise=guard_max_ppl_rise,
                max_total_neighbour_drop=guard_max_total_neighbour_drop,
                max_total_known_drop=guard_max_total_known_drop,
                max_total_ppl_rise=guard_max_total_ppl_rise,
                neighbour_cases=guard_cases,
                known_facts=guard_facts,
            ),
        )
        config.check()
        if setting:  # unknown names fail now, not after the model is loaded
            known = set(edit_method.hparams_class.model_fields) if edit_method.hparams_class else set()
            unknown = sorted(set(config.overrides) - known - {"layers"})
            if unknown:
                raise FactEditError(
                    f"--set: {method} has no hyper-parameter {', '.join(map(repr, unknown))}"
                    + (f" (it has: {', '.join(sorted(known))})" if known else "")
                )
        if generation:
            check_corpus(reference_corpus, "--reference-corpus")
        check_output_path(out, "--out")
        from factedit import distributed  # here, not at the top: --help must not import torch

        distributed.init(choice.device)  # under torchrun: join the group first (on CUDA, cuda = cuda:LOCAL_RANK)
        mdl, tok = choice.load(caches=("models", "stats", "templates", "memit-z", "data"))
        report = run_evaluation(mdl, tok, config, out, model_name=choice.label, progress=progress())
    except FactEditError as exc:
        fail(exc)
    if not distributed.is_main():  # rank 0 speaks for the run
        return
    skipped = f"; {report.skipped} malformed records skipped (see the manifest)" if report.skipped else ""
    if config.guard is not None:
        from factedit.evaluation.records import read_cases

        refused = sum((r.get("guard") or {}).get("verdict") == "refused" for r in read_cases(report.out_dir).values())
        skipped += f"; the guard refused {refused} edit(s) (rolled back; see guard.jsonl)"
    console.print(
        f"{report.out_dir}: {report.already_done + report.evaluated}/{report.total} cases "
        f"({report.evaluated} now, {report.errors} failed){skipped} in {report.seconds:.0f}s",
        highlight=False,
        markup=False,
    )


def _guard_settings(on: bool, **given: float | int | None):
    """``--guard`` and its limits as GuardSettings (None without ``--guard``; a limit without it is refused)."""
    from factedit.evaluation.config import GuardSettings

    chosen = {k: v for k, v in given.items() if v is not None}
    if not on:
        if chosen:
            raise FactEditError("the --guard-* options set the guard's limits and probe: add --guard")
        return None
    return GuardSettings(**chosen)


def summarize_command(
    runs: Annotated[list[Path], typer.Argument(help="run folders written by 'factedit eval'", metavar="RUN")],
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or both", metavar="FORMAT")] = "markdown",
    csv_out: Annotated[
        Optional[Path], typer.Option("--csv", help="also write the CSV table to this file", metavar="FILE")
    ] = None,
    plot_out: Annotated[
        Optional[Path], typer.Option("--plot", help="draw a bar plot (PNG/PDF) to this file", metavar="FILE")
    ] = None,
    all_cases: Annotated[
        bool,
        typer.Option(
            "--all-cases/--common-cases",
            help="use every run's own cases, or only the cases every run has (comparable rows)",
        ),
    ] = False,
    pre: Annotated[
        bool, typer.Option("--pre/--no-pre", help="include the unedited model's row (the scores before editing)")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Side-by-side table of runs: mean ± 95% CI of every metric and of S."""
    from dataclasses import asdict

    from factedit.evaluation.summary import plot, summarize_runs, to_csv, to_markdown
    from factedit.paths import check_output_path

    if fmt not in ("markdown", "csv", "both"):
        fail(FactEditError("--format must be markdown, csv or both"))
    try:
        for run in runs:
            if not run.is_dir():
                raise FactEditError(f"run folder {run} {'is a file' if run.exists() else 'not found'}")
        if csv_out:
            check_output_path(csv_out, "--csv", folder=False)
        if plot_out:
            from matplotlib.backend_bases import FigureCanvasBase

            formats = FigureCanvasBase.get_supported_filetypes()
            if plot_out.suffix and plot_out.suffix.lower().lstrip(".") not in formats:
                raise FactEditError(f"--plot {plot_out}: unknown image format; use one of {', '.join(sorted(formats))}")
            check_output_path(plot_out, "--plot", folder=False)
        summary = summarize_runs(runs, common=not all_cases, pre=pre)
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
            console.print(f"plot written to {plot(summary, plot_out)}")
    except FactEditError as exc:
        fail(exc)


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="run folders written by 'factedit eval'", metavar="RUN")],
    out: Annotated[Path, typer.Option(help="folder for index.html and its figures", metavar="DIR")],
    cases: Annotated[
        int, typer.Option(help="sample cases shown with their answers before/after", min=0, max=1000, metavar="N")
    ] = 10,
    all_cases: Annotated[
        bool,
        typer.Option("--all-cases/--common-cases", help="use every run's own cases, or only the cases every run has"),
    ] = False,
    pre: Annotated[bool, typer.Option("--pre/--no-pre", help="include the unedited model's row")] = True,
) -> None:
    """One self-contained HTML page (no scripts, nothing from the network) about runs: the summary table,
    bar plots per metric, drift curves and sample cases before/after."""
    from factedit.evaluation.report import write_report
    from factedit.paths import check_output_path

    try:
        for run in runs:
            if not run.is_dir():
                raise FactEditError(f"run folder {run} {'is a file' if run.exists() else 'not found'}")
        check_output_path(out, "--out")
        page = write_report(runs, out, cases=cases, common=not all_cases, pre=pre)
    except FactEditError as exc:
        fail(exc)
    console.print(f"report written to {page}", highlight=False, markup=False)


@with_model_options
def locate_command(
    out: Annotated[
        Path, typer.Option(help="folder for rome.json, memit.json, locate.json, the trace and the sweep", metavar="DIR")
    ] = Path("locate"),
    n: Annotated[int, typer.Option(help="known facts the model predicts to trace", min=1, metavar="N")] = 100,
    radius: Annotated[
        int, typer.Option(help="sweep the layers within this distance of the trace peak", min=0, max=16, metavar="R")
    ] = 2,
    sweep_cases: Annotated[
        int, typer.Option(help="CounterFact records edited at each swept layer", min=1, metavar="N")
    ] = 20,
    sweep_start: Annotated[
        int, typer.Option(help="first CounterFact record of the sweep (default: after dev-500)", min=0, metavar="N")
    ] = 500,
    samples: Annotated[int, typer.Option(help="noise samples per corrupted run", min=1, metavar="N")] = 10,
    window: Annotated[int, typer.Option(help="MLP layers restored together", min=1, metavar="N")] = 10,
    approx: Annotated[
        bool, typer.Option("--approx", help="trace with first-order estimates (attribution patching): faster")
    ] = False,
    data: Annotated[
        Optional[Path], typer.Option(help="CounterFact file (default: the data folder's)", metavar="FILE")
    ] = None,
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Choose a model's ROME and MEMIT layers: causal trace of known facts, then a ROME layer sweep around
    the MLP peak; writes hyper-parameter files for --hparams (resumable: rerun to continue)."""
    from factedit.evaluation.locate import LocateSettings, locate
    from factedit.paths import check_output_path

    try:
        settings = LocateSettings(
            n_facts=n,
            samples=samples,
            window=window,
            radius=radius,
            sweep_cases=sweep_cases,
            sweep_start=sweep_start,
            data_path=str(data) if data else None,
            approx=approx,
        )
        settings.check()
        if data is not None and not data.is_file():
            raise FactEditError(f"--data {data} {'is a folder: give the file' if data.is_dir() else 'not found'}")
        check_output_path(out, "--out")
        mdl, tok = choice.load(caches=("models", "stats", "templates", "tracing", "data"))
        report = locate(mdl, tok, out, settings, model_name=choice.label, progress=progress())
    except FactEditError as exc:
        fail(exc)
    from rich.table import Table

    table = Table(title=f"{choice.label}: ROME layer sweep ({settings.sweep_cases} CounterFact records)")
    for col in ("layer", "MLP AIE (trace)", "ES", "PS", "NS", "S"):
        table.add_column(col)
    effect = {row["layer"]: row["mean"] for row in report.trace}
    for row in report.sweep:
        marks = ("  rule" if row["layer"] == report.rule_layer else "") + (
            "  best" if row["layer"] == report.best_layer else ""
        )
        table.add_row(
            f"{row['layer']}{marks}",
            f"{effect.get(row['layer'], float('nan')):.4f}",
            *(f"{row.get(k, float('nan')):.1f}" for k in ("ES", "PS", "NS", "S")),
        )
    console.print(table)
    console.print(
        f"trace peak (rule): layer {report.rule_layer}; sweep best: layer {report.best_layer}; MEMIT layers "
        f"{report.memit_layers[0]}-{report.memit_layers[-1]}; wrote {', '.join(report.files.values())}",
        highlight=False,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``summarize``, ``report`` and ``locate`` to the ``factedit`` command."""
    app.command("eval")(eval_command)
    app.command("summarize")(summarize_command)
    app.command("report")(report_command)
    app.command("locate")(locate_command)
