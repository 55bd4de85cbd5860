"""``factedit trace`` and ``factedit trace-dataset``: causal tracing from the command line.

Registered into the main app by ``factedit.cli.main``; also runnable on its own:
``python -m factedit.cli.trace trace --prompt ... --subject ...``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from factedit.cli.options import (
    ChatOpt,
    DataDirOpt,
    ModelChoice,
    chat_or_raw,
    console,
    fail,
    progress,
    warn,
    with_model_options,
)
from factedit.errors import FactEditError

SamplesOpt = Annotated[int, typer.Option(help="noise samples per corrupted run", min=1, metavar="N")]
NoiseOpt = Annotated[
    Optional[float],
    typer.Option(
        help="fixed noise scale (std); default: --noise-factor × std of subject-token embeddings over known facts",
        metavar="STD",
    ),
]
NoiseFactorOpt = Annotated[
    float, typer.Option(help="multiple of the embedding std used when --noise is not given", metavar="X")
]
WindowOpt = Annotated[
    int, typer.Option(help="layers restored together for MLP/attention (official: l-5..l+4 for 10)", min=1, metavar="N")
]
SeedOpt = Annotated[int, typer.Option(help="seed of the noise generator", min=0, max=2**63 - 1, metavar="N")]
BatchOpt = Annotated[
    int, typer.Option(help="restorations × noise samples per forward pass (fast method)", min=1, metavar="N")
]
SeverOpt = Annotated[
    bool, typer.Option("--sever", help="also trace hidden states with MLP / attention severed (paper Fig. 3)")
]
FormatsOpt = Annotated[
    str, typer.Option(help="comma-separated figure formats, e.g. png,pdf or png,svg", metavar="LIST")
]
ApproxOpt = Annotated[
    bool,
    typer.Option(
        "--approx",
        help="estimate the scores to first order (attribution patching: the same noised runs and one backward "
        "pass) instead of re-running the model per restored state",
    ),
]
VerifyOpt = Annotated[
    Optional[int],
    typer.Option(
        help="with --approx: re-patch exactly the K cells per kind with the largest estimated effect (and a few "
        "seeded random ones) and report how well the estimates agree there",
        metavar="K",
    ),
]


AutocastOpt = Annotated[
    Optional[str],
    typer.Option(
        help="bfloat16: matrix products in bfloat16 under torch.autocast (several times faster on CPUs with AMX; "
        "scores differ from float32 by bfloat16 rounding)",
        metavar="DTYPE",
    ),
]


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        raise FactEditError(f"unknown figure format(s) {bad or text!r}: choose from png, pdf, svg")
    return formats


def _method(method: str, approx: bool, verify: int | None) -> tuple[str, int]:
    """The method and the number of cells to verify, from ``--method``, ``--approx`` and ``--verify``."""
    if verify is not None and not approx and method != "attribution":
        raise FactEditError("--verify re-patches the cells of an estimated trace: give --approx with it")
    if verify is not None and (isinstance(verify, bool) or verify < 0):
        raise FactEditError(f"--verify must be a whole number of cells, 0 or more; got {verify}")
    if approx and method == "straightforward":
        raise FactEditError("--approx estimates the scores: leave out --method straightforward")
    return ("attribution" if approx else method), (verify or 0)


def _kinds(kind: str, sever: bool) -> list[str]:
    from factedit.tracing import KINDS, SEVERED_KINDS

    if kind == "all":
        kinds = list(KINDS)
    elif kind in KINDS:
        kinds = [kind]
    else:
        raise FactEditError(f"unknown --kind {kind!r}: hidden, mlp, attn or all")
    return kinds + (list(SEVERED_KINDS) if sever else [])


@with_model_options
def trace_command(
    prompt: Annotated[
        str, typer.Option(help="the prompt with the subject in it (or {} where the subject goes)", metavar="TEXT")
    ],
    subject: Annotated[str, typer.Option(help="the subject, e.g. 'Space Needle'", metavar="TEXT")],
    answer: Annotated[
        Optional[str], typer.Option(help="answer to trace (default: the model's top next token)", metavar="TEXT")
    ] = None,
    kind: Annotated[str, typer.Option(help="hidden, mlp, attn or all", metavar="KIND")] = "all",
    sever: SeverOpt = False,
    samples: SamplesOpt = 10,
    noise: NoiseOpt = None,
    noise_factor: NoiseFactorOpt = 3.0,
    window: WindowOpt = 10,
    seed: SeedOpt = 1,
    method: Annotated[
        str,
        typer.Option(
            help="fast, straightforward (the official computation) or attribution (the same as --approx)",
            metavar="NAME",
        ),
    ] = "fast",
    approx: ApproxOpt = False,
    verify: VerifyOpt = None,
    batch_size: BatchOpt = 512,
    out: Annotated[Path, typer.Option(help="folder for trace.json, trace.npz and the heatmaps", metavar="DIR")] = Path(
        "trace"
    ),
    formats: FormatsOpt = "png,pdf",
    autocast: AutocastOpt = None,
    chat: ChatOpt = False,
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Causal trace of one fact: heatmaps of restored hidden states, MLP and attention outputs."""
    from factedit.paths import check_output_path
    from factedit.text import as_template, check_text
    from factedit.tracing import causal_trace
    from factedit.tracing.core import check_trace_settings
    from factedit.tracing.plots import plot_trace_all

    try:  # every setting, the prompt and the output folder are checked before the model is loaded
        method, n_verify = _method(method, approx, verify)
        kinds = _kinds(kind, sever)
        fmts = _formats(formats)
        template = as_template(prompt, subject)
        if answer is not None:
            check_text(answer, "--answer")
        check_trace_settings(
            kinds=kinds,
            samples=samples,
            noise=noise,
            noise_factor=noise_factor,
            window=window,
            batch_size=batch_size,
            method=method,
            autocast=autocast,
            verify=n_verify,
        )
        check_output_path(out, "--out")
        mdl, tok = choice.load(caches=("models", "tracing"))
        fmt = chat_or_raw(tok, chat, choice.label)
        result = causal_trace(
            mdl,
            tok,
            fmt.wrap(template) if fmt else prompt,
            subject,
            answer,
            kinds=kinds,
            samples=samples,
            noise=noise,
            noise_factor=noise_factor,
            window=window,
            seed=seed,
            method=method,
            batch_size=batch_size,
            autocast=autocast,
            verify=n_verify,
            progress=progress(),
        )
        result.meta["model"] = choice.label
        files = result.save(out) + plot_trace_all(result, out, formats=fmts)
    except FactEditError as exc:
        fail(exc)
    if not result.answer_is_prediction:
        warn(f"the model predicts {result.predicted!r}, not {result.answer!r}")
    title = (
        f"{result.prompt!r} → {result.answer!r}: clean p={result.clean_prob:.4f}, corrupted "
        f"p={result.low_prob:.4f} (noise {result.noise:.4g}, {result.samples} samples)"
    )
    if result.estimated:
        title += " — first-order estimates (attribution patching)"
    table = Table(title=escape(title))
    columns = ["kind", "peak token", "peak layer", "p restored", "indirect effect"]
    if result.estimated:
        columns += ["peak is", "Spearman", f"top-{n_verify} overlap"] if n_verify else ["peak is"]
    for col in columns:
        table.add_column(col)
    for k in result.kinds:
        t, layer, score = result.peak(k)
        row = [k, escape(f"{t} {result.tokens[t]!r}"), str(layer), f"{score:.4f}", f"{score - result.low_prob:+.4f}"]
        if result.estimated:
            row.append("exact" if result.exact_mask(k)[t, layer] else "estimated")
            if n_verify:
                cert = result.certificate.get(k, {})
                row += [_number(cert.get("spearman")), _number(cert.get("top_k_overlap"))]
        table.add_row(*row)
    console.print(table)
    if result.estimated:
        console.print(
            f"map estimated in {result.meta['seconds_estimate']:.1f}s; {result.meta['restorations']} cells "
            f"re-patched exactly; {result.meta['seconds']:.1f}s in all; wrote {len(files)} files to {out}"
        )
    else:
        console.print(
            f"{result.meta['restorations']} restorations in {result.meta['seconds']:.1f}s; wrote "
            f"{len(files)} files to {out}"
        )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@with_model_options
def trace_dataset_command(
    n: Annotated[
        Optional[int],
        typer.Option(help="number of facts the model predicts to trace (default: all)", min=1, metavar="N"),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="output folder (results.jsonl, effects.csv/json, plots); resumable", metavar="DIR")
    ] = Path("trace-known"),
    data: Annotated[
        Optional[Path],
        typer.Option(help="known_1000.json (default: the data folder's, the cache's, or downloaded)", metavar="FILE"),
    ] = None,
    sever: Annotated[
        bool, typer.Option("--sever/--no-sever", help="also trace severed paths at the last subject token (Fig. 3)")
    ] = True,
    samples: SamplesOpt = 10,
    noise: NoiseOpt = None,
    noise_factor: NoiseFactorOpt = 3.0,
    window: WindowOpt = 10,
    seed: SeedOpt = 1,
    batch_size: BatchOpt = 512,
    approx: ApproxOpt = False,
    verify: VerifyOpt = None,
    summarize_only: Annotated[
        bool, typer.Option("--summarize-only", help="only summarise the facts already traced in --out (no model)")
    ] = False,
    autocast: AutocastOpt = None,
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Average indirect effects over the known facts the model predicts (paper Fig. 2), with 95% CIs."""
    from factedit.paths import check_output_path
    from factedit.tracing.core import check_trace_settings
    from factedit.tracing.dataset import trace_dataset, write_summary

    try:
        if summarize_only:
            table = write_summary(out)
        else:  # settings, data file and output folder checked before the model is loaded
            method, n_verify = _method("fast", approx, verify)
            check_trace_settings(
                samples=samples,
                noise=noise,
                noise_factor=noise_factor,
                window=window,
                batch_size=batch_size,
                autocast=autocast,
                method=method,
                verify=n_verify,
            )
            if data is not None and not data.is_file():
                raise FactEditError(f"--data {data} {'is a folder: give the file' if data.is_dir() else 'not found'}")
            check_output_path(out, "--out")
            mdl, tok = choice.load(caches=("models", "tracing", "data"))
            table = trace_dataset(
                mdl,
                tok,
                out,
                n=n,
                data=data,
                severed=sever,
                samples=samples,
                noise=noise,
                noise_factor=noise_factor,
                window=window,
                seed=seed,
                batch_size=batch_size,
                autocast=autocast,
                method=method,
                verify=n_verify,
                progress=progress(),
            )
    except FactEditError as exc:
        fail(exc)
    summary = Table(
        title=f"average indirect effects over {table.n_facts} facts (clean p={table.mean_clean_prob:.3f},"
        f" corrupted p={table.mean_low_prob:.3f})"
    )
    for col in ("kind", "peak bucket", "peak layer", "AIE", "95% CI"):
        summary.add_column(col)
    for k, p in table.peaks().items():
        ci = f"[{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]"
        summary.add_row(k, p["bucket"], str(p["layer"]), f"{p['mean']:.4f}", ci)
    console.print(summary)
    _print_agreement(out)
    console.print(escape(f"table: {out / 'effects.csv'}, plots: {out}"))


def _print_agreement(out: Path) -> None:
    """The certificates averaged over the facts, when the run estimated and verified them."""
    import json

    try:
        agreement = json.loads((out / "effects.json").read_text()).get("certificate")
    except (OSError, ValueError):
        return
    if not agreement:
        return
    table = Table(title="estimates against exact re-patching at the verified cells (median over facts)")
    for col in ("kind", "facts", "K", "Spearman", "top-K overlap", "largest |error|"):
        table.add_column(col)
    for kind, row in agreement.items():
        table.add_row(
            kind,
            str(row["n_facts"]),
            str(row["k"]),
            *(_number(row[m]["median"]) for m in ("spearman", "top_k_overlap", "max_abs_error")),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``trace`` and ``trace-dataset`` to the main app."""
    app.command("trace")(trace_command)
    app.command("trace-dataset")(trace_dataset_command)


def main() -> None:
    """Stand-alone entry point (the same commands without the rest of the CLI)."""
    from factedit.cli.group import FactEditGroup

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(
        cls=FactEditGroup, add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="Causal tracing."
    )
    register(app)
    app()


if __name__ == "__main__":
    main()
