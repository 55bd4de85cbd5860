"""The ``factedit`` command: edit, predict, generate, stats; patch, tracing, evaluation and the web app
register their own commands.

A thin front end: commands parse options, call the core and render what it returns. Nothing heavy
(torch, transformers, the editing code) is imported before a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from factedit.cli.group import FactEditGroup
from factedit.cli.options import (  # noqa: F401 - re-exported for code that imported them from here
    VERBOSE_HELP,
    ChatOpt,
    DataDirOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelChoice,
    ModelOpt,
    ThreadsOpt,
    chat_or_raw,
    check_corpus,
    console,
    err,
    fail,
    load,
    progress,
    setup_logging,
    with_model_options,
)
from factedit.cli.render import METHOD_CHOICES, batch_table, check_method_name, probe_table
from factedit.errors import FactEditError

log = logging.getLogger(__name__)

app = typer.Typer(
    cls=FactEditGroup,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,  # a traceback (bugs only, with -v) as plain text, not a wrapped rich panel
    pretty_exceptions_show_locals=False,
    help="Locate and edit facts in language models.",
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False) -> None:
    """Locate and edit facts in language models."""
    setup_logging(verbose)


def _single_request(prompt: str | None, subject: str | None, target: str | None, true_target: str | None):
    from factedit.editing.requests import EditRequest

    if prompt is None or subject is None or target is None:
        raise FactEditError("--prompt, --subject and --target are required (or --requests FILE)")
    return EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=true_target)


@app.command()
@with_model_options
def edit(
    prompt: Annotated[Optional[str], typer.Option(help="prompt with {} where the subject goes", metavar="TEXT")] = None,
    subject: Annotated[Optional[str], typer.Option(help="the subject, e.g. 'Eiffel Tower'", metavar="TEXT")] = None,
    target: Annotated[Optional[str], typer.Option(help="the new target, e.g. Rome", metavar="TEXT")] = None,
    true_target: Annotated[
        Optional[str], typer.Option(help="the current answer (default: the model's top next token)", metavar="TEXT")
    ] = None,
    requests: Annotated[
        Optional[Path],
        typer.Option(
            help="JSON list of requests (CounterFact records or {prompt, subject, target}) instead of --prompt...",
            metavar="FILE",
        ),
    ] = None,
    paraphrase: Annotated[
        Optional[list[str]],
        typer.Option(help="paraphrased prompt to check, subject filled in (repeatable)", metavar="TEXT"),
    ] = None,
    neighbour: Annotated[
        Optional[list[str]],
        typer.Option(help="prompt about another subject that must not change (repeatable)", metavar="TEXT"),
    ] = None,
    method: Annotated[str, typer.Option(help=f"editing method: {', '.join(METHOD_CHOICES)}", metavar="NAME")] = "rome",
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential", help="with --requests: edit batch after batch, keeping every edit, instead of all at once"
        ),
    ] = False,
    batch: Annotated[
        Optional[int], typer.Option(help="with --sequential: requests per step (default 1)", min=1, metavar="N")
    ] = None,
    layer: Annotated[
        Optional[list[int]],
        typer.Option(help="layer to edit (repeatable; default: the hyper-parameter file's)", metavar="N"),
    ] = None,
    hparams: Annotated[
        Optional[Path],
        typer.Option(
            help="hyper-parameter JSON file (default: the method's file for the model family)", metavar="FILE"
        ),
    ] = None,
    corpus: Annotated[
        Optional[str],
        typer.Option(
            help="text for the second-moment statistics (file, folder or wikitext-103/wikipedia)", metavar="SPEC"
        ),
    ] = None,
    stats: Annotated[
        Optional[Path],
        typer.Option(help="precomputed second moment (.safetensors) of the single edited layer", metavar="FILE"),
    ] = None,
    save: Annotated[
        Optional[Path], typer.Option(help="folder to write the patch (or one per step) to", metavar="DIR")
    ] = None,
    z_cache: Annotated[
        Optional[Path],
        typer.Option(
            help="MEMIT-based methods, one batch: folder keeping each chunk's z vectors, so the same command "
            "again (after an interruption, or a failed torchrun rank) skips the chunks already done",
            metavar="DIR",
        ),
    ] = None,
    guard: Annotated[
        bool,
        typer.Option(
            "--guard",
            help="after the edit, probe unrelated known facts, held-out perplexity and the --neighbour prompts; "
            "if they moved past the limits of docs/evaluation.md ('Guarded edits'), undo the edit and save nothing",
        ),
    ] = False,
    chat: ChatOpt = False,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Edit facts and compare the predictions before and after.

    Any method: ROME for one fact, MEMIT/AlphaEdit for a batch, FT/FT-L, or 'none' to only probe. Prints
    the top next tokens and p(new)/p(true) on the prompt, paraphrases and neighbours before and after,
    then whether the edit converged and whether the new target is now the top prediction.

    Started with ``torchrun --nproc-per-node N -m factedit edit ...``: MEMIT/AlphaEdit share the batch's work
    between the N processes (the same patch); other methods edit on rank 0 alone once the statistics are
    computed together. Rank 0 alone prints and writes the patch; see docs/distributed.md."""
    check_method_name(method)
    from factedit import distributed
    from factedit.editing.methods import get_method
    from factedit.editing.report import check_probe_texts, edit_and_compare
    from factedit.editing.requests import load_requests
    from factedit.editing.resources import EditResources
    from factedit.paths import check_output_path

    try:
        # everything that can be checked without the model, before it is loaded and before any work
        edit_method = get_method(method)
        if requests is not None:
            if prompt or subject or target or true_target:
                raise FactEditError("give either --requests or --prompt/--subject/--target, not both")
            batch_requests = load_requests(requests)
        else:
            batch_requests = [_single_request(prompt, subject, target, true_target)]
        if batch is not None and not sequential:
            raise FactEditError("--batch applies with --sequential only (a batch method edits the whole file at once)")
        if not sequential:
            edit_method.check_requests(batch_requests, None)  # one-fact methods refuse a batch before loading
        _check_layers(layer)
        edit_method.check_source(hparams)
        check_probe_texts(paraphrase or (), neighbour or ())
        check_corpus(corpus)
        if stats is not None:
            _check_input_file(stats, "--stats")
        if save is not None:
            check_output_path(save, "--save")
        if z_cache is not None:
            _check_z_cache(edit_method, sequential)
            check_output_path(z_cache, "--z-cache")
        if guard and sequential:
            raise FactEditError(
                "--guard judges one edit: for a guarded sequence use `factedit eval --sequential --guard`"
            )
        if guard and distributed.launched():
            raise FactEditError("--guard runs in one process: start factedit edit --guard without torchrun")
        distributed.init(choice.device)  # before the load: on GPUs each rank takes cuda:LOCAL_RANK
        mdl, tok = choice.load(caches=("models", "stats", "templates"))
        hp = edit_method.hparams(mdl, hparams, {"layers": layer} if layer else None)
        moments = _given_second_moment(mdl, hp, stats) if stats is not None else None
        resources = EditResources(mdl, tok, corpus=corpus, second_moment=moments)
        main_rank = distributed.is_main()
        alone = distributed.active() and not _shares_batch(edit_method)
        if alone:  # the statistics (if any) by every rank together, the edit by rank 0 alone
            if hp is not None and hp.stats_spec is not None:
                resources.moments_with(hp, moments, progress() if main_rank else False)
            if not main_rank:
                return
            log.info("%s does not share its work between processes: rank 0 edits alone", edit_method.name)
        edit_guard = _edit_guard(mdl, tok, batch_requests, neighbour or ()) if guard else None
        with distributed.independent() if alone else contextlib.nullcontext():
            report = edit_and_compare(
                mdl,
                tok,
                batch_requests,
                edit_method,
                hp,
                resources=resources,
                paraphrases=paraphrase or (),
                neighbours=neighbour or (),
                sequential=sequential,
                batch_size=batch or 1,
                prompt_format=chat_or_raw(tok, chat, choice.label),
                progress=progress() if main_rank else False,
                **({"z_cache": z_cache} if z_cache is not None else {}),
            )
        verdict = edit_guard.check_applied(mdl, tok, report.applied) if edit_guard is not None else None
        saved = _save_patches(report.patches, save) if save and (verdict is None or verdict.accepted) else None
    except FactEditError as exc:
        fail(exc)
    if not main_rank:  # every rank holds the same edited model and report: rank 0 reports it
        return
    if as_json:
        out = report.to_dict()
        out = {"request": out.pop("request"), **out, "patch": saved[0] if saved and len(saved) == 1 else saved}
        if verdict is not None:
            out["guard"] = verdict.record()
        sys.stdout.write(json.dumps(out) + "\n")
        if verdict is not None and not verdict.accepted:
            raise typer.Exit(3)
        return
    layers = ",".join(map(str, report.layers or [])) or "-"
    if len(report.requests) == 1:
        r = report.requests[0]
        console.print(
            probe_table(
                f"{r.text!r}: {r.true_text!r} -> {r.new_text!r}  ({report.method}, layer {layers}, "
                f"{report.edit_seconds:.1f}s)",
                report.rows,
            )
        )
    else:
        console.print(
            batch_table(
                f"{report.method}: {len(report.requests)} edits (layer {layers}) in {report.edit_seconds:.1f}s", report
            )
        )
    if report.drift:
        console.print(
            "earlier edits still holding after each step: "
            + " ".join(f"{d['edits_holding']:.2f}" for d in report.drift if d["edits_holding"] is not None)
        )
    console.print(report.summary_line())
    if verdict is not None and not verdict.accepted:
        console.print("the guard refused the edit and undid it (nothing saved): " + "; ".join(verdict.reasons))
        raise typer.Exit(3)
    if verdict is not None:
        console.print("the guard accepted the edit: " + _guard_change(verdict))
    if saved:
        console.print(f"patch saved to {', '.join(saved) if len(saved) < 4 else saved[0] + ' ...'}")
    elif save:
        console.print("no patch to save: the method made no edit")


def _edit_guard(mdl, tok, requests, neighbours):
    """The guard of ``edit --guard``, measured on the model before the edit."""
    from factedit.evaluation.guard import EditGuard

    return EditGuard.for_requests(mdl, tok, requests, neighbours)


def _guard_change(verdict) -> str:
    """One line: how the guard's measures moved."""
    parts = []
    for key, label, scale in (("neighbour_kept", "neighbours kept", 100), ("known_acc", "known facts", 100)):
        if verdict.before.get(key) is not None and verdict.after.get(key) is not None:
            parts.append(f"{label} {scale * verdict.before[key]:.0f}% -> {scale * verdict.after[key]:.0f}%")
    if verdict.before.get("ppl") is not None and verdict.after.get("ppl") is not None:
        parts.append(f"perplexity {verdict.before['ppl']:.2f} -> {verdict.after['ppl']:.2f}")
    return ", ".join(parts) or "nothing to measure"


def _given_second_moment(mdl, hp, path: Path) -> dict:
    """``--stats FILE``: the second moment of the one edited layer, checked against the layer's size."""
    from factedit.models import arch_for
    from factedit.stats.second_moment import load_second_moment

    if hp is None or hp.stats_spec is None:
        raise FactEditError(
            "--stats applies to methods that use second moments (rome, rome-original, memit, alphaedit, emmet)"
        )
    if len(hp.layers) != 1:
        raise FactEditError("--stats gives one matrix: use it with a single --layer")
    layer = hp.layers[0]
    moment = load_second_moment(path)
    if moment.shape[0] not in mdl.get_parameter(arch_for(mdl).rewrite_weight_at(layer)).shape:
        raise FactEditError(f"--stats matrix of size {moment.shape[0]} does not fit layer {layer}")
    return {layer: moment}


def _check_layers(layers: list[int] | None, option: str = "--layer") -> None:
    """Layers are never negative nor given twice (the model's depth is checked once it is loaded)."""
    bad = [x for x in layers or [] if x < 0]
    if bad:
        raise FactEditError(f"{option} {bad[0]} is out of range: layers are numbered from 0")
    twice = sorted({x for x in layers or [] if (layers or []).count(x) > 1})
    if twice:
        raise FactEditError(f"{option} {twice[0]} is given twice: give each layer once")


def _check_input_file(path: Path, option: str) -> None:
    """An input file that must exist and be a file (checked before the model is loaded)."""
    if path.is_dir():
        raise FactEditError(f"{option} {path} is a folder: give a file")
    if not path.is_file():
        raise FactEditError(f"{option} {path} not found")


def _shares_batch(edit_method) -> bool:
    """Whether the method shares one batch's work between torchrun's processes (its ``sharded`` capability);
    under torchrun the others edit on rank 0 alone."""
    return edit_method.capabilities.sharded


def _check_z_cache(edit_method, sequential: bool) -> None:
    """``--z-cache`` keeps MEMIT's z vectors of one batch (a sequence's are computed on ever-changing weights)."""
    from factedit.editing.methods import METHODS

    if not _shares_batch(edit_method):
        names = ", ".join(name for name, m in METHODS.items() if _shares_batch(m))
        raise FactEditError(f"--z-cache applies to the methods built on MEMIT ({names}), not {edit_method.name}")
    if sequential:
        raise FactEditError("--z-cache applies to one batch, not to --sequential (each step edits other weights)")


def _save_patches(patches, folder: Path) -> list[str]:
    """Write the patch (or one per step); under torchrun rank 0 alone writes (every rank holds the same)."""
    from factedit import distributed

    if not distributed.is_main():
        return []
    if len(patches) == 1:
        return [str(patches[0].save(folder))]
    return [str(p.save(folder / f"step{i:04d}")) for i, p in enumerate(patches)]


@app.command()
@with_model_options
def predict(
    prompt: Annotated[list[str], typer.Argument(help="text(s) to continue", metavar="TEXT")],
    k: Annotated[int, typer.Option(help="how many next tokens", min=1, metavar="K")] = 5,
    patch: Annotated[Optional[Path], typer.Option(help="apply this patch file first", metavar="FILE")] = None,
    chat: ChatOpt = False,
    as_json: JsonOpt = False,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Top-k next tokens for each prompt."""
    from factedit.predict import top_next_tokens
    from factedit.text import check_text

    try:
        for text in prompt:
            check_text(text, "text")
        if patch is not None:
            _check_input_file(patch, "--patch")
        mdl, tok = choice.load(patch)
        fmt = chat_or_raw(tok, chat, choice.label)
        tops = top_next_tokens(mdl, tok, [fmt.wrap(t) if fmt else t for t in prompt], k)
    except FactEditError as exc:
        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps([{"text": t, "top": top} for t, top in zip(prompt, tops, strict=True)]) + "\n")
        return
    for text, top in zip(prompt, tops, strict=True):
        console.print(f"[bold]{escape(text)}[/]  " + escape("  ".join(f"{t!r} {p:.3f}" for t, p in top)))


@app.command()
@with_model_options
def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue", metavar="TEXT")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate", min=1, metavar="N")] = 40,
    sample: Annotated[bool, typer.Option("--sample", help="top-k sampling instead of greedy decoding")] = False,
    seed: Annotated[
        int, typer.Option(help="seed of the sampler (with --sample)", min=0, max=2**63 - 1, metavar="N")
    ] = 0,
    patch: Annotated[Optional[Path], typer.Option(help="apply this patch file first", metavar="FILE")] = None,
    chat: ChatOpt = False,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Continue a prompt (optionally with a patch applied)."""
    from factedit.predict import MAX_NEW_TOKENS
    from factedit.predict import generate as gen
    from factedit.text import check_text

    try:
        check_text(prompt, "text")
        if max_new_tokens > MAX_NEW_TOKENS:
            raise FactEditError(f"--max-new-tokens {max_new_tokens:,} is too many: at most {MAX_NEW_TOKENS:,}")
        if patch is not None:
            _check_input_file(patch, "--patch")
        mdl, tok = choice.load(patch)
        fmt = chat_or_raw(tok, chat, choice.label)
        text = gen(
            mdl, tok, fmt.wrap(prompt) if fmt else prompt, max_new_tokens=max_new_tokens, sample=sample, seed=seed
        )
    except FactEditError as exc:
        fail(exc)
    console.print(f"[bold]{escape(prompt)}[/]{escape(text)}")


@app.command()
@with_model_options
def stats(
    layer: Annotated[list[int], typer.Option(help="layer (repeatable); all are collected in one pass", metavar="N")],
    corpus: Annotated[
        Optional[str],
        typer.Option(
            help="text file, folder, or wikitext-103/wikipedia (default: the data folder's Wikipedia text)",
            metavar="SPEC",
        ),
    ] = None,
    tokens: Annotated[
        int,
        typer.Option(
            help="sample size in tokens (at least the layer's input features, e.g. 1536 for the default model)",
            min=1,
            max=10**9,
            metavar="N",
        ),
    ] = 100_000,
    max_length: Annotated[
        int, typer.Option(help="tokens per document at most", min=8, max=131_072, metavar="N")
    ] = 1024,
    dtype_acc: Annotated[
        str, typer.Option("--accumulate", help="accumulation dtype: float32 or float64", metavar="DTYPE")
    ] = "float32",
    data_dir: DataDirOpt = None,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Compute (or load from cache) the second moment E[kkᵀ] of the rewrite module's input.

    Started with ``torchrun --nproc-per-node N -m factedit stats ...`` the pass is shared by the N processes
    (same result, same cache file); see docs/distributed.md."""
    from factedit import distributed
    from factedit.editing.hparams import check_stats_tokens
    from factedit.stats.second_moment import ACC_DTYPES, second_moments

    try:
        _check_layers(layer)
        check_corpus(corpus)
        if dtype_acc not in ACC_DTYPES:
            raise FactEditError(f"--accumulate {dtype_acc!r}: choose one of {', '.join(ACC_DTYPES)}")
        distributed.init(choice.device)  # before the load: on GPUs each rank takes cuda:LOCAL_RANK
        mdl, tok = choice.load(caches=("models", "stats"))
        check_stats_tokens(mdl, layer, tokens, "--tokens")
        started = time.perf_counter()
        moments = second_moments(
            mdl, tok, layer, corpus=corpus, n_tokens=tokens, max_length=max_length, dtype=dtype_acc, progress=progress()
        )
    except FactEditError as exc:
        fail(exc)
    if not distributed.is_main():  # the ranks hold the same matrices: one of them reports
        return
    for lyr, c in moments.items():
        console.print(f"layer {lyr}: {tuple(c.shape)}  trace {float(c.trace()):.4g}")
    shared = f" by {distributed.world_size()} processes" if distributed.active() else ""
    console.print(f"done{shared} in {time.perf_counter() - started:.1f}s")


def _register_optional() -> None:
    """Commands of the other front-end modules (patch files, tracing, evaluation, web app) add themselves;
    those modules import nothing heavy at module level either."""
    for module in ("patches", "trace", "evaluate", "serve"):
        importlib.import_module(f"factedit.cli.{module}").register(app)


_register_optional()

__all__ = ["app", "console", "err", "DeviceOpt", "DtypeOpt", "ModelOpt"]

if __name__ == "__main__":
    app()
