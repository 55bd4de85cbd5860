"""The ``factedit`` command: edit, predict, generate, stats, patch; tracing registers its own commands."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from factedit.errors import FactEditError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Locate and edit facts in language models.")
patch_app = typer.Typer(no_args_is_help=True, help="Apply, revert or inspect patch files.")
app.add_typer(patch_app, name="patch")
console = Console()
err = Console(stderr=True)
log = logging.getLogger("factedit")

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="registry name, .gguf file, folder or hub id")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
ORIGINALS = "factedit-originals.safetensors"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def _load(model: str | None, device: str, dtype: str):
    from factedit.models import load_model

    return load_model(model, device=device, dtype=dtype)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False) -> None:
    _setup_logging(verbose)


def _print_probe_table(title: str, before: list[dict], after: list[dict] | None) -> None:
    table = Table(title=title, show_lines=True, width=max(console.width, 120))
    table.add_column("prompt")
    table.add_column("before: top-5 next tokens")
    table.add_column("p(new) / p(true)")
    if after is not None:
        table.add_column("after: top-5 next tokens")
        table.add_column("p(new) / p(true)")

    def fmt_top(row):
        return "\n".join(f"{t!r} {p:.3f}" for t, p in row["top"])

    def fmt_p(row):
        true = "-" if row["p_target_true"] is None else f"{row['p_target_true']:.3g}"
        return f"{row['p_target_new']:.3g} / {true}"

    for i, b in enumerate(before):
        cells = [f"[{b['kind']}]\n{b['text']}", fmt_top(b), fmt_p(b)]
        if after is not None:
            cells += [fmt_top(after[i]), fmt_p(after[i])]
        table.add_row(*cells)
    console.print(table)


@app.command()
def edit(
    prompt: Annotated[Optional[str], typer.Option(help="prompt with {} for the subject")] = None,
    subject: Annotated[Optional[str], typer.Option(help="the subject, e.g. 'Eiffel Tower'")] = None,
    target: Annotated[Optional[str], typer.Option(help="the new target, e.g. Rome")] = None,
    true_target: Annotated[Optional[str], typer.Option(help="the current answer (default: the model's top token)")] = None,
    requests: Annotated[Optional[Path], typer.Option(help="JSON list of requests (CounterFact records or {prompt, subject, target})")] = None,
    paraphrase: Annotated[Optional[list[str]], typer.Option(help="paraphrased prompt(s) to check, subject filled in")] = None,
    neighbour: Annotated[Optional[list[str]], typer.Option(help="prompt(s) about other subjects that must not change")] = None,
    method: Annotated[str, typer.Option(help="rome, rome-original (no r-ROME key fix), memit or alphaedit")] = "rome",
    sequential: Annotated[bool, typer.Option(help="with --requests: edit batch after batch instead of all at once")] = False,
    batch: Annotated[int, typer.Option(help="with --sequential: requests per step")] = 1,
    layer: Annotated[Optional[list[int]], typer.Option(help="layer(s) to edit (default: hyper-parameter file)")] = None,
    hparams: Annotated[Optional[Path], typer.Option(help="hyper-parameter JSON file")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="text for the second-moment statistics")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="precomputed second moment (.safetensors) for the edit layer")] = None,
    save: Annotated[Optional[Path], typer.Option(help="folder to write the patch to")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Edit facts (ROME for one, MEMIT/AlphaEdit for a batch) and show predictions before and after."""
    from factedit.editing.hparams import ROMEHyperParams
    from factedit.editing.requests import EditRequest, load_requests
    from factedit.editing.sequential import METHODS
    from factedit.models import arch_for
    from factedit.predict import probe, top_next_tokens
    from factedit.stats.second_moment import load_second_moment

    try:
        if method not in ("rome", "rome-original", "memit", "alphaedit"):
            raise FactEditError(f"unknown method {method!r}: rome, rome-original, memit or alphaedit")
        if requests is not None:
            if prompt or subject or target:
                raise FactEditError("give either --requests or --prompt/--subject/--target, not both")
            batch_requests = load_requests(requests)
        elif prompt is None or subject is None or target is None:
            raise FactEditError("--prompt, --subject and --target are required (or --requests FILE)")
        else:
            batch_requests = [EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=true_target)]
        family = "rome" if method.startswith("rome") else method
        if family == "rome" and len(batch_requests) > 1 and not sequential:
            raise FactEditError("ROME edits one fact: use --method memit or alphaedit, or --sequential")
        mdl, tok = _load(model, device, dtype)
        hp_cls = METHODS[family]
        hp = hp_cls.from_json(hparams) if hparams else hp_cls.for_model(mdl)
        changes = {"consistent_key": method == "rome"} if family == "rome" else {}
        if layer:
            changes["layers"] = layer
        hp = hp.replace(**changes)
        hp.check_model(mdl)
        if family != "rome" and not sequential:
            from factedit.editing.memit import check_batch

            batch_requests = check_batch(batch_requests, hp.fact_token)  # before any probing or statistics
        moments = None
        if stats is not None:
            if len(hp.layers) != 1:
                raise FactEditError("--stats gives one matrix: use it with a single --layer")
            width = mdl.get_parameter(arch_for(mdl).rewrite_weight_at(hp.layers[0])).shape
            moments = {hp.layers[0]: load_second_moment(stats)}
            if moments[hp.layers[0]].shape[0] not in width:
                raise FactEditError(f"--stats matrix of size {moments[hp.layers[0]].shape[0]} does not fit the layer")
        filled = []
        for r in batch_requests:
            if r.target_true is None:
                top = top_next_tokens(mdl, tok, [r.text], 1)[0][0][0]
                r = EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                                target_true=top.strip() or top, case_id=r.case_id)
            filled.append(r)
        batch_requests = filled
        single = len(batch_requests) == 1
        checks_of = []
        for r in batch_requests:
            checks = [("prompt", r.text)]
            if single:
                checks += [("paraphrase", p) for p in paraphrase or []]
                checks += [("neighbour", p) for p in neighbour or []]
            checks_of.append(checks)
        before = [probe(mdl, tok, c, r.new_text, r.true_text) for c, r in zip(checks_of, batch_requests)]
        started = time.perf_counter()
        patches, timings, drift = _run_edit(mdl, tok, family, hp, batch_requests, moments, corpus, sequential, batch,
                                     progress=not as_json)
        seconds = time.perf_counter() - started
        after = [probe(mdl, tok, c, r.new_text, r.true_text) for c, r in zip(checks_of, batch_requests)]
        saved = None
        if save:
            saved = [str(p.save(save / f"step{i:04d}" if len(patches) > 1 else save)) for i, p in enumerate(patches)]
    except FactEditError as exc:
        _fail(exc)
    name = patches[0].method
    if as_json:
        flat = lambda rows: [row for group in rows for row in group]  # noqa: E731
        out = {"request": batch_requests[0].to_dict() if single else None,
               "requests": [r.to_dict() for r in batch_requests], "method": name, "layers": hp.layers,
               "before": flat(before), "after": flat(after), "edit_seconds": seconds, "timings": timings, "drift": drift,
               "patch": saved[0] if saved and len(saved) == 1 else saved}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    if single:
        r = batch_requests[0]
        _print_probe_table(f"{r.text!r}: {r.true_text!r} -> {r.new_text!r}  ({name}, "
                           f"layer {','.join(map(str, hp.layers))}, {seconds:.1f}s)", before[0], after[0])
    else:
        _print_batch_table(name, batch_requests, before, after, seconds)
    if drift:
        console.print("earlier edits still holding after each step: "
                      + " ".join(f"{d['edits_holding']:.2f}" for d in drift if d["edits_holding"] is not None))
    if saved:
        console.print(f"patch saved to {', '.join(saved) if len(saved) < 4 else saved[0] + ' ...'}")


def _run_edit(mdl, tok, family, hp, requests, moments, corpus, sequential, batch, progress):
    """Compute and apply the edit(s); returns the applied patches, their timings and (sequential)
    the share of earlier edits still holding after every step."""
    from factedit.editing.alphaedit import compute_alphaedit
    from factedit.editing.memit import compute_memit
    from factedit.editing.rome import compute_rome
    from factedit.editing.sequential import SequentialEditor

    if sequential:
        editor = SequentialEditor(mdl, tok, family, hp, second_moment=moments, corpus=corpus, progress=progress)
        drift = editor.run(requests, batch_size=batch, after_step=lambda step, done: editor.edits_holding(done))
        return editor.patches, [p.info.get("timings") for p in editor.patches], drift
    if family == "rome":
        patch, results = compute_rome(mdl, tok, requests[0], hp, second_moment=moments, corpus=corpus,
                                      progress=progress)
        timings = [r.timings for r in results]
    elif family == "memit":
        patch = compute_memit(mdl, tok, requests, hp, second_moment=moments, corpus=corpus, progress=progress)
        timings = patch.info["timings"]
    else:
        patch, _ = compute_alphaedit(mdl, tok, requests, hp, second_moment=moments, corpus=corpus, progress=progress)
        timings = patch.info["timings"]
    patch.apply(mdl)
    return [patch], timings, None


def _print_batch_table(method: str, requests, before, after, seconds: float) -> None:
    table = Table(title=f"{method}: {len(requests)} edits in {seconds:.1f}s", width=max(console.width, 120))
    for col in ("prompt", "new target", "before: top-1", "after: top-1", "p(new) before -> after"):
        table.add_column(col)
    for r, b, a in zip(requests, before, after):
        table.add_row(r.text, r.new_text, b[0]["top"][0][0], a[0]["top"][0][0],
                      f"{b[0]['p_target_new']:.3g} -> {a[0]['p_target_new']:.3g}")
    console.print(table)


@app.command()
def predict(
    prompt: Annotated[list[str], typer.Argument(help="text(s) to continue")],
    k: Annotated[int, typer.Option(help="how many next tokens")] = 5,
    patch: Annotated[Optional[Path], typer.Option(help="apply this patch first")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Top-k next tokens for each prompt."""
    from factedit.editing.patch import Patch
    from factedit.predict import top_next_tokens

    try:
        mdl, tok = _load(model, device, dtype)
        if patch:
            Patch.load(patch).apply(mdl)
        tops = top_next_tokens(mdl, tok, prompt, k)
    except FactEditError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps([{"text": t, "top": top} for t, top in zip(prompt, tops)]) + "\n")
        return
    for text, top in zip(prompt, tops):
        console.print(f"[bold]{text}[/]  " + "  ".join(f"{t!r} {p:.3f}" for t, p in top), highlight=False)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option()] = 40,
    sample: Annotated[bool, typer.Option(help="top-k sampling instead of greedy")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    patch: Annotated[Optional[Path], typer.Option(help="apply this patch first")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Continue a prompt (optionally with a patch applied)."""
    from factedit.editing.patch import Patch
    from factedit.predict import generate as gen

    try:
        mdl, tok = _load(model, device, dtype)
        if patch:
            Patch.load(patch).apply(mdl)
        text = gen(mdl, tok, prompt, max_new_tokens=max_new_tokens, sample=sample, seed=seed)
    except FactEditError as exc:
        _fail(exc)
    console.print(f"[bold]{prompt}[/]{text}", highlight=False)


@app.command()
def stats(
    layer: Annotated[list[int], typer.Option(help="layer(s); all collected in one pass")],
    corpus: Annotated[Optional[str], typer.Option(help="text file, folder, or wikitext-103/wikipedia")] = None,
    tokens: Annotated[int, typer.Option(help="sample size in tokens")] = 100_000,
    max_length: Annotated[int, typer.Option(help="tokens per document at most")] = 1024,
    dtype_acc: Annotated[str, typer.Option("--accumulate", help="float32 or float64")] = "float32",
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Compute (or load from cache) the second moment E[kkᵀ] of the rewrite module's input."""
    from factedit.stats.second_moment import second_moments

    try:
        mdl, tok = _load(model, device, dtype)
        started = time.perf_counter()
        moments = second_moments(mdl, tok, layer, corpus=corpus, n_tokens=tokens, max_length=max_length,
                                 dtype=dtype_acc, progress=True)
    except FactEditError as exc:
        _fail(exc)
    for lyr, c in moments.items():
        console.print(f"layer {lyr}: {tuple(c.shape)}  trace {float(c.trace()):.4g}")
    console.print(f"done in {time.perf_counter() - started:.1f}s")


@patch_app.command("show")
def patch_show(path: Annotated[Path, typer.Argument(help="patch file or folder")]) -> None:
    """Print a patch's metadata and the size of each weight change."""
    from factedit.editing.patch import Patch

    try:
        console.print(Patch.load(path).summary(), highlight=False)
    except FactEditError as exc:
        _fail(exc)


@patch_app.command("apply")
def patch_apply(
    path: Annotated[Path, typer.Argument(help="patch file or folder")],
    out: Annotated[Path, typer.Option(help="folder to write the edited model to")],
    force: Annotated[bool, typer.Option(help="apply even if the weights differ from the patch's base")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Apply a patch and save the edited model (with the original weights, for an exact revert)."""
    from safetensors.torch import save_file

    from factedit.editing.patch import Patch

    try:
        p = Patch.load(path)
        mdl, tok = _load(model, device, dtype)
        if out.exists() and any(out.iterdir()):
            raise FactEditError(f"output folder {out} is not empty")
        originals = {e.name: mdl.get_parameter(e.name).detach().clone().cpu() for e in p.entries}
        p.apply(mdl, force=force)
    except FactEditError as exc:
        _fail(exc)
    mdl.save_pretrained(out)
    tok.save_pretrained(out)
    save_file(originals, str(out / ORIGINALS), metadata={"patch": p.base_fingerprint})
    console.print(f"edited model written to {out}")


@patch_app.command("revert")
def patch_revert(
    path: Annotated[Path, typer.Argument(help="patch file or folder")],
    model: Annotated[Path, typer.Option("--model", "-m", help="folder written by 'patch apply'")],
    out: Annotated[Path, typer.Option(help="folder to write the restored model to")],
) -> None:
    """Restore the pre-patch weights of a model written by ``patch apply`` (bit-exact)."""
    import torch
    from safetensors.torch import load_file

    from factedit.editing.patch import Patch
    from factedit.models import model_fingerprint

    try:
        p = Patch.load(path)
        originals_file = model / ORIGINALS
        if not originals_file.is_file():
            raise FactEditError(f"{model} has no {ORIGINALS}: it was not written by 'factedit patch apply'")
        if out.exists() and any(out.iterdir()):
            raise FactEditError(f"output folder {out} is not empty")
        originals = load_file(str(originals_file))
        if set(originals) != {e.name for e in p.entries}:
            raise FactEditError("this model was edited by another patch")
        mdl, tok = _load(str(model), "cpu", "float32")
        with torch.no_grad():
            for name, tensor in originals.items():
                mdl.get_parameter(name).copy_(tensor)
        if model_fingerprint(mdl) != p.base_fingerprint:
            raise FactEditError("restored weights do not match the patch's base model")
    except FactEditError as exc:
        _fail(exc)
    mdl.save_pretrained(out)
    tok.save_pretrained(out)
    console.print(f"restored model written to {out}")


def _register_optional() -> None:
    """Commands from other sub-packages (tracing, evaluation, web) register themselves here."""
    import importlib
    import importlib.util

    for module in ("trace", "evaluate", "serve"):
        if importlib.util.find_spec(f"factedit.cli.{module}") is not None:
            importlib.import_module(f"factedit.cli.{module}").register(app)


_register_optional()

if __name__ == "__main__":
    app()
