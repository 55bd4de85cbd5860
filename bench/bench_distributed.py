"""2 processes x 1 thread (torchrun, gloo) against 1 process x 2 threads: statistics, MEMIT, evaluation.

    flock /tmp/factedit-model.lock python bench/bench_distributed.py [--out runs/bench_distributed.json]
        [--tokens 20000] [--edits 100] [--cases 20] [--tiny]

Six measurements, each in a fresh process (or pair of torchrun ranks) on the default model (or ``--model``):
for both settings, second-moment tokens per second (a fresh pass of ``--tokens`` tokens, no cache), a MEMIT
batch of ``--edits`` CounterFact requests (its z, keys and solve times: z and keys are shared by the ranks,
the solve is rank 0's), and ROME evaluation cases per minute over ``--cases`` cases. Statistics and
templates the edits need are computed (and cached) before timing; each measurement has a warm-up.

Resumable: each finished measurement is written to ``--out`` at once, and the same command again skips
what is there (a file made with other settings is refused). Estimated at about 20 minutes on the default
model on a 2-core machine. There both processes share the same 2 cores, so the speed-up shows the overhead
and the balance of the sharding (MEMIT's z is split by chunk of ``batch_size`` requests: 100 edits are chunks of
32, 32, 32 and 4, so one rank gets 64 requests), not what a cluster gives. ``--tiny``: a tiny random GGUF
model (tests/gguf_files.py), a smoke run of the harness only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("stats", "memit", "eval")
SETTINGS = {1: "1 process x 2 threads", 2: "2 processes x 1 thread"}


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): one measurement; rank 0 prints one ``RESULT`` JSON line."""
    import torch

    from factedit import distributed
    from factedit.editing.hparams import MEMITHyperParams
    from factedit.editing.memit import compute_memit
    from factedit.editing.resources import EditResources
    from factedit.evaluation import RunConfig, run_evaluation
    from factedit.models.loading import load_model
    from factedit.stats.second_moment import second_moments

    torch.set_num_threads(args.threads)
    distributed.init("cpu")
    model, tok = load_model(args.model)
    sys.path.insert(0, str(REPO / "bench"))
    from common import counterfact

    result: dict = {"world_size": distributed.world_size(), "threads": torch.get_num_threads()}
    fast = {"v_num_grad_steps": 4} if args.tiny else {}
    if args.measure == "stats":
        layers = MEMITHyperParams.for_model(model).layers
        second_moments(model, tok, layers, n_tokens=min(args.tokens, 2000), cache=False, progress=False)  # warm-up
        distributed.barrier()
        t = time.perf_counter()
        second_moments(model, tok, layers, n_tokens=args.tokens, cache=False, progress=False)
        distributed.barrier()
        result["layers"] = layers
        result["stats_tokens_per_s"] = args.tokens / (time.perf_counter() - t)
    elif args.measure == "memit":
        hp = MEMITHyperParams.for_model(model, mom2_n_tokens=args.tokens, **fast)
        resources = EditResources(model, tok)
        _, templates = resources.for_hparams(hp, progress=False)  # statistics and templates before timing
        requests = [case.request for case in counterfact(args.edits)]
        compute_memit(model, tok, requests[: distributed.world_size()], hp, templates=templates, resources=resources)
        distributed.barrier()
        t = time.perf_counter()
        edit = compute_memit(model, tok, requests, hp, templates=templates, resources=resources)
        result["memit_total_s"] = time.perf_counter() - t
        result.update({f"memit_{k}_s": v for k, v in edit.timings.items()})
        starts = range(0, len(requests), hp.batch_size)
        result["memit_z_requests_per_rank"] = [
            sum(min(hp.batch_size, len(requests) - s) for s in distributed.shard(list(starts), r))
            for r in range(distributed.world_size())
        ]
    else:
        rome = {"mom2_n_tokens": args.tokens, **fast}
        out = Path(args.scratch) / "eval"
        config = RunConfig(method="rome", dataset="counterfact", n=1, overrides=rome)
        run_evaluation(model, tok, config, f"{out}-warm", progress=False)  # ROME's statistics and templates
        distributed.barrier()
        t = time.perf_counter()
        config = RunConfig(method="rome", dataset="counterfact", n=args.cases, overrides=rome)
        report = run_evaluation(model, tok, config, out, progress=False)
        result["eval_cases_per_min"] = report.evaluated / ((time.perf_counter() - t) / 60)
    if distributed.is_main():
        print("RESULT " + json.dumps(result), flush=True)


def launch(args: argparse.Namespace, world: int, measure: str) -> dict:
    """One measurement in fresh process(es): ``world`` torchrun ranks of ``2 // world`` threads each."""
    with tempfile.TemporaryDirectory() as scratch:
        base = [__file__, "--worker", "--measure", measure, "--tokens", str(args.tokens), "--edits", str(args.edits)]
        base += ["--cases", str(args.cases), "--model", args.model or "", "--scratch", scratch]
        base += ["--tiny"] if args.tiny else []
        base += ["--threads", str(2 // world)]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // world)}
        if world == 1:
            command = [sys.executable, *base]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
            command += base
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{SETTINGS[world]}, {measure}: failed (run the same command again to resume)\n"
                         f"{done.stderr[-4000:]}")  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _write(path: Path, state: dict) -> None:
    """Replace the results file whole (an interrupted write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(state, indent=1))
    os.replace(partial, path)


def speed_ups(results: dict) -> dict:
    """How much faster 2 processes are than 1 process with 2 threads (> 1: faster)."""
    one, two = results.get("1"), results.get("2")
    if not one or not two:
        return {}
    pairs = {
        "stats": ("stats_tokens_per_s", True),
        "memit_z": ("memit_z_s", False),
        "memit_keys": ("memit_keys_s", False),
        "memit_total": ("memit_total_s", False),
        "eval": ("eval_cases_per_min", True),
    }
    out = {}
    for name, (key, higher_is_better) in pairs.items():
        if key in one and key in two:
            out[name] = round(two[key] / one[key] if higher_is_better else one[key] / two[key], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000, help="statistics sample (fresh pass, not cached)")
    ap.add_argument("--edits", type=int, default=100, help="MEMIT batch size")
    ap.add_argument("--cases", type=int, default=20, help="evaluation cases (ROME)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random GGUF model: smoke run of the harness")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None, help="results file (resumable; default runs/bench_distributed.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.model = args.model or None
        worker(args)
        return
    sys.path.insert(0, str(REPO / "bench"))
    from common import machine

    print(machine(), flush=True)
    settings = {"tokens": args.tokens, "edits": args.edits, "cases": args.cases, "tiny": args.tiny, "model": args.model}
    with tempfile.TemporaryDirectory() as tiny_folder:
        if args.tiny:
            sys.path.insert(0, str(REPO))
            from tests.gguf_files import write_tiny_gguf  # noqa: I001 - after the path it needs

            from factedit.models.loading import load_model

            args.model = str(Path(tiny_folder) / "tiny.gguf")
            write_tiny_gguf(args.model, "llama", matrix_type="F32")
            os.environ["FACTEDIT_HOME"] = str(Path(tiny_folder) / "home")
            load_model(args.model)  # converted once, before the ranks read it
            out_path = Path(args.out) if args.out else None  # a smoke run keeps nothing unless asked
        else:
            out_path = Path(args.out or REPO / "runs" / "bench_distributed.json")
        saved = json.loads(out_path.read_text()) if out_path is not None and out_path.is_file() else None
        if saved is not None and saved["settings"] != settings:
            raise SystemExit(
                f"{out_path} holds results for other settings {saved['settings']}: delete it or pass those"
            )
        state = saved or {"machine": machine(), "settings": settings, "results": {"1": {}, "2": {}}}
        for measure in MEASURES:
            for world in (1, 2):
                done = state["results"][str(world)]
                if any(key.startswith(measure) for key in done):
                    print(f"{SETTINGS[world]}, {measure}: already measured", flush=True)
                    continue
                t = time.perf_counter()
                done.update(launch(args, world, measure))
                print(f"{SETTINGS[world]}, {measure}: done in {time.perf_counter() - t:.0f}s", flush=True)
                if out_path is not None:
                    _write(out_path, state)
    for world in (1, 2):
        print(f"{SETTINGS[world]:<23}", json.dumps(state["results"][str(world)]))
    state["speed_up"] = speed_ups(state["results"])
    print("speed-up of 2 processes (both share the same 2 cores):", json.dumps(state["speed_up"]))
    if out_path is not None:
        _write(out_path, state)
        print(f"results in {out_path}")


if __name__ == "__main__":
    main()
