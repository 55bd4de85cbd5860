"""2 processes x 1 thread (torchrun, gloo) against 1 process x 2 threads: statistics, MEMIT z, evaluation.

    python bench/bench_distributed.py [--tokens 20000] [--edits 100] [--cases 20] [--tiny]

For each setting the same worker runs once alone (``torch.set_num_threads(2)``) and once as two torchrun
ranks (one thread each), and reports: second-moment tokens per second (a fresh pass, no cache), the z
time of a MEMIT batch of ``--edits`` CounterFact requests, and ROME evaluation cases per minute. On a
2-core machine both processes share the same 2 cores, so the speed-up shows the overhead and scaling of
the sharding, not what a cluster gives. ``--tiny``: a tiny random GGUF model (tests/gguf_files.py), a smoke
run of the harness only. Needs the model lock for the default model (run under ``flock``).
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


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): measure, and rank 0 prints one JSON line."""
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
    layers = MEMITHyperParams.for_model(model).layers
    overrides = {"mom2_n_tokens": args.tokens, **({"v_num_grad_steps": 4} if args.tiny else {})}
    hp = MEMITHyperParams.for_model(model, **overrides)
    resources = EditResources(model, tok)
    _, templates = resources.for_hparams(hp, progress=False)  # statistics and templates before timing
    requests = [case.request for case in counterfact(args.edits)]
    # warm-up (first calls, caches of the corpus hash, templates and statistics), not timed
    second_moments(model, tok, layers, n_tokens=min(args.tokens, 2000), cache=False, progress=False)
    compute_memit(model, tok, requests[: distributed.world_size()], hp, templates=templates, resources=resources)
    distributed.barrier()
    t = time.perf_counter()
    second_moments(model, tok, layers, n_tokens=args.tokens, cache=False, progress=False)
    distributed.barrier()
    result["stats_tokens_per_s"] = args.tokens / (time.perf_counter() - t)

    distributed.barrier()
    edit = compute_memit(model, tok, requests, hp, templates=templates, resources=resources)
    result["memit_z_s"] = edit.timings["z"]
    result["memit_total_s"] = sum(edit.timings.values())

    out = Path(args.scratch) / f"eval-{distributed.world_size()}"
    rome = {"mom2_n_tokens": args.tokens, **({"v_num_grad_steps": 4} if args.tiny else {})}
    run_evaluation(  # warm-up: ROME's statistics and templates, one case
        model, tok, RunConfig(method="rome", dataset="counterfact", n=1, overrides=rome), f"{out}-warm", progress=False
    )
    t = time.perf_counter()
    report = run_evaluation(
        model, tok, RunConfig(method="rome", dataset="counterfact", n=args.cases, overrides=rome), out, progress=False
    )
    result["eval_cases_per_min"] = report.evaluated / ((time.perf_counter() - t) / 60)
    if distributed.is_main():
        print("RESULT " + json.dumps(result), flush=True)


def launch(args: argparse.Namespace, world: int, scratch: str) -> dict:
    base = [__file__, "--worker", "--tokens", str(args.tokens), "--edits", str(args.edits)]
    base += ["--cases", str(args.cases), "--model", args.model or "", "--scratch", scratch]
    base += ["--tiny"] if args.tiny else []
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // world)}
    if world == 1:
        command = [sys.executable, *base, "--threads", "2"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        command += [*base, "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{world} process(es) failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000, help="statistics sample (fresh pass, not cached)")
    ap.add_argument("--edits", type=int, default=100, help="MEMIT batch size")
    ap.add_argument("--cases", type=int, default=20, help="evaluation cases (ROME)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random GGUF model: smoke run of the harness")
    ap.add_argument("--model", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            sys.path.insert(0, str(REPO))
            from tests.gguf_files import write_tiny_gguf  # noqa: I001 - after the path it needs

            from factedit.models.loading import load_model

            args.model = str(Path(scratch) / "tiny.gguf")
            write_tiny_gguf(args.model, "llama", matrix_type="F32")
            os.environ.setdefault("FACTEDIT_HOME", str(Path(scratch) / "home"))
            load_model(args.model)  # converted once, before the ranks read it
        alone = launch(args, 1, scratch)
        shared = launch(args, 2, scratch)
    print("1 process x 2 threads ", json.dumps(alone))
    print("2 processes x 1 thread", json.dumps(shared))
    speed = {
        "stats": shared["stats_tokens_per_s"] / alone["stats_tokens_per_s"],
        "memit_z": alone["memit_z_s"] / shared["memit_z_s"],
        "eval": shared["eval_cases_per_min"] / alone["eval_cases_per_min"],
    }
    print(
        "speed-up of 2 processes (both share the same 2 cores):", json.dumps({k: round(v, 2) for k, v in speed.items()})
    )


if __name__ == "__main__":
    main()
