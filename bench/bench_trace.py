"""Benchmark: a full single-fact causal trace, fast path vs the official one-forward-per-restoration way.

    python bench/bench_trace.py [--reps 3] [--samples 10] [--threads 1] [--out out/bench_trace.json]

Both methods trace hidden states, MLP and attention (window 10) at every token and
layer with the same noise; runs alternate (fast, straightforward, fast, ...) in one
process so that load from other users hits both alike. Prints wall-clock and CPU-time
medians, the speed-up ratios, the largest score difference and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from factedit import load_model
from factedit.paths import atomic_write_bytes
from factedit.tracing import KINDS, causal_trace

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "Space Needle"


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--subject", default=SUBJECT)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    kw = dict(kinds=KINDS, samples=args.samples, window=10, seed=1)
    causal_trace(model, tok, args.prompt, args.subject, tokens=[-1], layers=[0], **kw)  # warm-up, noise std cached

    runs: dict[str, list[tuple[float, float]]] = {"fast": [], "straightforward": []}
    results = {}
    for rep in range(args.reps):
        for method in ("fast", "straightforward"):
            res, wall, cpu = timed(
                lambda method=method: causal_trace(
                    model, tok, args.prompt, args.subject, method=method, batch_size=args.batch_size, **kw
                )
            )
            runs[method].append((wall, cpu))
            results[method] = res
            print(
                f"rep {rep + 1}/{args.reps} {method:15s} wall {wall:7.1f}s  cpu {cpu:7.1f}s  "
                f"({res.meta['restorations']} restorations)",
                flush=True,
            )
    diff = max(
        float(np.nanmax(np.abs(results["fast"].scores[k] - results["straightforward"].scores[k]))) for k in KINDS
    )
    med = {
        m: {"wall_s": statistics.median(w for w, _ in r), "cpu_s": statistics.median(c for _, c in r)}
        for m, r in runs.items()
    }
    fast, slow = med["fast"], med["straightforward"]
    summary = {
        "prompt": args.prompt,
        "subject": args.subject,
        "tokens": len(results["fast"].tokens),
        "layers": results["fast"].num_layers,
        "samples": args.samples,
        "kinds": list(KINDS),
        "reps": args.reps,
        "batch_size": args.batch_size,
        "medians": med,
        "runs": runs,
        "speedup_wall": slow["wall_s"] / fast["wall_s"],
        "speedup_cpu": slow["cpu_s"] / fast["cpu_s"],
        "max_abs_score_diff": diff,
        "machine": machine(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"\nfull trace of {args.prompt!r} ({summary['tokens']} tokens x {summary['layers']} layers x "
        f"{len(KINDS)} kinds, {args.samples} samples), medians of {args.reps}:"
    )
    print(f"  fast            wall {fast['wall_s']:7.1f}s  cpu {fast['cpu_s']:7.1f}s")
    print(f"  straightforward wall {slow['wall_s']:7.1f}s  cpu {slow['cpu_s']:7.1f}s")
    print(
        f"  speed-up        wall {summary['speedup_wall']:.2f}x  cpu {summary['speedup_cpu']:.2f}x   "
        f"(max |score difference| {diff:.2e})"
    )
    print(f"machine: {summary['machine']}\nplatform: {summary['platform']}; torch threads: {summary['torch_threads']}")
    if args.out:
        atomic_write_bytes(args.out, json.dumps(summary, indent=1).encode())


if __name__ == "__main__":
    main()
