"""How much does bfloat16 autocast change causal traces? Compares two ``factedit trace-dataset``
folders of the same model, noise and seed (one float32, one ``--autocast bfloat16``) on the facts
both traced, and optionally times one fact both ways.

    python bench/trace_precision.py out/trace_known_fp32 out/trace_known_bf16 [--time]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from factedit.tracing.dataset import read_results


def compare(fp32_dir: str, bf16_dir: str) -> dict:
    a = {r["known_id"]: r for r in read_results(fp32_dir) if "scores" in r}
    b = {r["known_id"]: r for r in read_results(bf16_dir) if "scores" in r}
    common = sorted(set(a) & set(b))
    out: dict = {"facts": len(common), "kinds": {}}
    clean = [abs(a[k]["clean_prob"] - b[k]["clean_prob"]) for k in common]
    out["clean_prob_max_abs_diff"] = max(clean) if clean else None
    for kind in ("hidden", "mlp", "attn"):
        diffs, corrs, same_peak = [], [], 0
        for k in common:
            x = np.array(a[k]["scores"][kind], dtype=float)
            y = np.array(b[k]["scores"][kind], dtype=float)
            ok = ~(np.isnan(x) | np.isnan(y))
            diffs.append(float(np.max(np.abs(x[ok] - y[ok]))))
            corrs.append(float(np.corrcoef(x[ok], y[ok])[0, 1]))
            same_peak += np.unravel_index(np.nanargmax(x), x.shape) == np.unravel_index(np.nanargmax(y), y.shape)
        out["kinds"][kind] = {
            "max_abs_diff": max(diffs),
            "median_max_abs_diff": float(np.median(diffs)),
            "min_corr": min(corrs),
            "median_corr": float(np.median(corrs)),
            "same_peak_cell": f"{same_peak}/{len(common)}",
        }
    return out


def time_one(prompt: str, subject: str) -> dict:
    import torch

    from factedit import load_model
    from factedit.tracing import causal_trace

    model, tok = load_model()
    seconds = {}
    for name in ("float32", "bfloat16"):
        t = time.perf_counter()
        causal_trace(model, tok, prompt, subject, autocast=None if name == "float32" else name)
        seconds[name] = time.perf_counter() - t
    return {
        "prompt": prompt,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "speedup": seconds["float32"] / seconds["bfloat16"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp32_dir")
    ap.add_argument("bf16_dir")
    ap.add_argument("--time", action="store_true", help="also time one fact (Space Needle) both ways")
    args = ap.parse_args()
    from common import machine

    print(machine())
    print(json.dumps(compare(args.fp32_dir, args.bf16_dir), indent=1))
    if args.time:
        print(json.dumps(time_one("The Space Needle is located in the city of", "Space Needle"), indent=1))


if __name__ == "__main__":
    main()
