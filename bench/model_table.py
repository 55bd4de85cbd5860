"""The per-model table of issue 13, resumable: load times, located layers, ROME and MEMIT on CounterFact,
and the raw/chat transfer runs, one row per registry model.

Every step is a ``factedit`` command in its own process writing a run folder under ``--out``, so an
interrupted run (a session ends, a machine is handed back) continues when the same command is given
again; finished steps are read back, not redone. A finished step's small files (manifest, JSON lines,
located hyper-parameters) are copied to ``state/models/<model>/<step>`` for git, so a fresh checkout
skips it; ``--keep-partial`` (before a session ends) copies the unfinished steps' files to
``state/models/<model>/partial/<step>``, from which the next run resumes. Only one model-heavy process
runs at a time.

    python bench/model_table.py --models smollm2-135m gemma3-270m --out runs/models            # everything
    python bench/model_table.py --models qwen2.5-0.5b --steps load,locate,rome --out runs/models
    python bench/model_table.py --out runs/models --table-only                                  # print the table
    python bench/model_table.py --models gemma3-270m --out runs/models --keep-partial           # session ends

Steps per model: ``load`` (cold: a fresh home converts the GGUF; cached: a second process), ``locate``
(trace peak + ROME layer sweep, ``factedit locate``), ``rome`` (ROME on the first ``--n`` dev cases with
the located ``rome.json``, else the defaults), ``memit`` (one batch of ``--n`` edits, located
``memit.json``), ``chat`` (ROME runs chat/chat, raw->chat and chat->raw; models without a chat template
are skipped with the reason). The generative view is off unless `--generative` (it more than doubles a case's time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, usable_cores

STATE = Path("state/models")  # small state files of finished steps, committed so a fresh checkout skips them

FACTEDIT = [str(Path(sys.executable).with_name("factedit"))]
STEPS = ("load", "locate", "rome", "memit", "chat")
CHAT_RUNS = {"chat-chat": ("chat", "chat"), "raw-chat": ("raw", "chat"), "chat-raw": ("chat", "raw")}


def run(args: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    print("$ factedit " + " ".join(args), flush=True)
    subprocess.run([*FACTEDIT, *args], check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - started


def load_times(model: str, folder: Path) -> dict:
    path = folder / "load.json"
    kept = STATE / model / "load.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    if path.is_file():
        return json.loads(path.read_text())
    probe = ["predict", "--model", model, "--k", "1", "The Eiffel Tower is located in the city of"]
    with tempfile.TemporaryDirectory(prefix="factedit-cold-") as home:
        cold = run(probe, {"FACTEDIT_HOME": home})  # converts the GGUF into a fresh cache
    cached = run(probe)  # the user's cache (converted before, or by this call's first run)
    cached = min(cached, run(probe))
    out = {"cold_s": round(cold, 1), "cached_s": round(cached, 1), "note": "whole predict process, start to end"}
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(out))
    return out


def restore(folder: Path, step: str) -> bool:
    """A finished step's committed state back into its run folder; True when the step is done."""
    kept = STATE / folder.name / step
    if not kept.is_dir():
        return False
    target = folder / step
    target.mkdir(parents=True, exist_ok=True)
    for f in kept.iterdir():
        if f.is_file() and not (target / f.name).exists():
            (target / f.name).write_bytes(f.read_bytes())
    return True


def restore_partial(folder: Path, step: str) -> None:
    """An unfinished step kept with --keep-partial back into its run folder, so the step resumes from it."""
    kept = STATE / folder.name / "partial" / step
    if kept.is_dir() and not (folder / step / "manifest.json").is_file():
        shutil.copytree(kept, folder / step, dirs_exist_ok=True)


def keep_partial(out: Path, models: list[str]) -> None:
    """Every unfinished step's small files (a session is ending) under state/models/<model>/partial."""
    for model in models:
        for step in ("locate", "rome", "memit", *CHAT_RUNS):
            folder = out / model / step
            if (STATE / model / step).is_dir() or not folder.is_dir():
                continue
            kept = STATE / model / "partial" / step
            shutil.rmtree(kept, ignore_errors=True)
            for f in folder.rglob("*"):
                if f.is_file() and f.suffix in (".json", ".jsonl") and f.stat().st_size < 8 << 20:
                    (kept / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, kept / f.relative_to(folder))
            print(f"kept {folder} in {kept} (commit it; the next run of this table resumes from it)")


def keep(folder: Path, step: str) -> None:
    """A finished step's small files (manifest, JSON lines, located hyper-parameters) for git."""
    shutil.rmtree(STATE / folder.name / "partial" / step, ignore_errors=True)
    kept = STATE / folder.name / step
    kept.mkdir(parents=True, exist_ok=True)
    for f in sorted((folder / step).iterdir()):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".csv") and f.stat().st_size < 8 << 20:
            (kept / f.name).write_bytes(f.read_bytes())


def hparams(folder: Path, method: str) -> list[str]:
    located = folder / "locate" / f"{method}.json"
    return ["--hparams", str(located)] if located.is_file() else []


def has_chat_template(model: str) -> bool:
    probe = subprocess.run(
        [*FACTEDIT, "predict", "--model", model, "--chat", "--k", "1", "x"], capture_output=True, text=True
    )
    return probe.returncode == 0


def model_steps(model: str, steps: list[str], out: Path, n: int, threads: int, approx: bool, generative: bool) -> None:
    """Every step not finished yet (committed under state/models or done in ``out``), in order."""
    folder = out / model
    common = ["--model", model, "--threads", str(threads)]
    views = [] if generative else ["--no-generative"]  # greedy answers: more than half of a case's time
    evaluate = ["eval", *common, "--dataset", "counterfact", "--n", str(n), *views]

    def step(name: str, args: list[str]) -> None:
        if restore(folder, name):
            return
        restore_partial(folder, name)
        run(args)
        keep(folder, name)

    if "load" in steps:
        load_times(model, folder)
    if "locate" in steps:
        step("locate", ["locate", *common, *(["--approx"] if approx else []), "--out", str(folder / "locate")])
    if "rome" in steps:
        step("rome", [*evaluate, "--method", "rome", *hparams(folder, "rome"), "--out", str(folder / "rome")])
    if "memit" in steps:
        pre = ["--pre-from", str(folder / "rome")] if (folder / "rome" / "manifest.json").is_file() else []
        memit = ["--method", "memit", "--batch", str(n), *hparams(folder, "memit"), *pre]
        step("memit", [*evaluate, *memit, "--out", str(folder / "memit")])
    if "chat" in steps:
        if not has_chat_template(model):
            (folder / "chat-skipped.txt").write_text("the model's tokenizer has no chat template\n")
            return
        for name, (edit, score) in CHAT_RUNS.items():
            formats = ["--prompts-edit", edit, "--prompts-eval", score]
            step(name, [*evaluate, "--method", "rome", *hparams(folder, "rome"), *formats, "--out", str(folder / name)])


def summary(folder: Path) -> dict | None:
    if not (folder / "manifest.json").is_file():
        return None
    from factedit.evaluation.summary import summarize_runs

    table = summarize_runs([folder])
    pre, post = table.rows[0], table.rows[-1]
    cells = {k: round(c.mean, 1) for k, c in post.cells.items()}
    cells["n"] = post.n
    cells["pre_NS"] = round(pre.cells["NS"].mean, 1) if "NS" in pre.cells else None
    return cells


def print_table(models: list[str], out: Path) -> None:
    print(f"\nmachine: {cpu_name()}, {usable_cores()} cores")
    columns = (
        "model",
        "load cold / cached (s)",
        "trace peak",
        "ROME layer (sweep best)",
        "MEMIT layers",
        "ROME ES / PS / NS / ΔNS",
        "MEMIT ES / PS / NS",
        "s per ROME edit",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for model in models:
        folder = out / model
        loads = [p for p in (folder / "load.json", STATE / model / "load.json") if p.is_file()]
        load = json.loads(loads[0].read_text()) if loads else {}
        for name in ("locate", "rome", "memit", *CHAT_RUNS):
            restore(folder, name)  # a fresh checkout: the committed finished steps
        located = folder / "locate" / "locate.json"
        loc = json.loads(located.read_text()) if located.is_file() else {}
        rome, memit = summary(folder / "rome"), summary(folder / "memit")

        def cell(values, keys):
            return " / ".join(str(values.get(k, "–")) for k in keys) if values else "not run"

        print(
            f"| {model} | {load.get('cold_s', '–')} / {load.get('cached_s', '–')} | "
            f"{loc.get('rule_layer', '–')} | {loc.get('best_layer', '–')} | "
            f"{','.join(map(str, loc.get('memit_layers', []))) or '–'} | {cell(rome, ('ES', 'PS', 'NS', 'ΔNS'))} | "
            f"{cell(memit, ('ES', 'PS', 'NS'))} | {rome.get('edit s', '–') if rome else '–'} |"
        )
    print("\nraw/chat transfer (ROME, ES / PS / NS):")
    for model in models:
        rows = {"raw-raw": summary(out / model / "rome"), **{k: summary(out / model / k) for k in CHAT_RUNS}}
        parts = [f"{k} {v['ES']}/{v['PS']}/{v['NS']}" if v else f"{k} –" for k, v in rows.items()]
        print(f"  {model}: " + "; ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"])
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    ap.add_argument("--out", type=Path, default=Path("runs/models"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--approx", action="store_true", help="locate with the estimated trace (locate --approx)")
    ap.add_argument("--generative", action="store_true", help="also the generative view (doubles the time)")
    ap.add_argument("--keep-partial", action="store_true", help="copy unfinished steps' state for git, then stop")
    args = ap.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}")
    if args.keep_partial:
        keep_partial(args.out, args.models)
        return
    if not args.table_only:
        for model in args.models:
            model_steps(model, steps, args.out, args.n, args.threads, args.approx, args.generative)
    print_table(args.models, args.out)


if __name__ == "__main__":
    main()
