"""Benchmark: evaluated cases per minute per method (edit + evaluation + revert) on the default model.

    python bench/bench_eval.py [--n 5] [--dataset counterfact|zsre] [--methods none ft ft-l rome]
                               [--generation] [--threads 1]

Runs ``factedit.evaluation.run_evaluation`` on the first N cases into a temporary folder and
reports, per method, cases/minute from the per-case wall time (setup such as loading the model
and the cached second moment excluded), plus the median edit and evaluation seconds. Prints the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine

from factedit import load_model
from factedit.evaluation import RunConfig, run_evaluation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"])
    ap.add_argument("--methods", nargs="+", default=["none", "ft", "ft-l", "rome"])
    ap.add_argument("--generation", action="store_true", help="include fluency/consistency generation")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    model, tok = load_model()
    results = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            config = RunConfig(method=method, dataset=args.dataset, n=args.n, generation=args.generation)
            started = time.perf_counter()
            run_evaluation(model, tok, config, Path(tmp) / "run", progress=False)
            wall = time.perf_counter() - started
            lines = [json.loads(x) for x in (Path(tmp) / "run" / "cases.jsonl").read_text().splitlines()]
        per_case = [r["timing"]["total_s"] for r in lines if "timing" in r]
        results[method] = {
            "cases": len(per_case),
            "cases_per_min": 60 * len(per_case) / sum(per_case),
            "median_edit_s": statistics.median(r["timing"]["edit_s"] for r in lines if "timing" in r),
            "median_eval_s": statistics.median(r["timing"]["eval_s"] for r in lines if "timing" in r),
            "wall_s_with_setup": wall,
        }
        print(method, json.dumps({k: round(v, 3) for k, v in results[method].items()}), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"machine": machine(), "dataset": args.dataset, "generation": args.generation, "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
