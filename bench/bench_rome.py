"""Benchmark: one ROME edit (k / v / update), statistics throughput, default-model load time.

    python bench/bench_rome.py [--reps 3] [--plain] [--stats-tokens 20000]

Edit times exclude statistics (the official second moment from ../shared/reference is used
when present, else a cached one). Prints medians and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine
from safetensors.torch import load_file

from factedit import EditRequest, ROMEHyperParams, compute_rome, load_model
from factedit.stats.corpus import open_corpus
from factedit.stats.second_moment import collect_second_moments, second_moments

REFERENCE = Path(os.environ.get("FACTEDIT_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def bench_load() -> dict:
    home = os.environ.get("FACTEDIT_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FACTEDIT_HOME"] = tmp
        t = time.perf_counter()
        load_model(document_start=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        load_model(document_start=False)
        cached = time.perf_counter() - t
    if home is None:
        os.environ.pop("FACTEDIT_HOME")
    else:
        os.environ["FACTEDIT_HOME"] = home
    return {"cold_gguf_s": cold, "cached_s": cached}


def bench_edit(model, tok, reps: int, plain: bool) -> dict:
    hp = ROMEHyperParams.for_model(model, consistent_key=False, key_fit="mean")
    ref = REFERENCE / "rome_official_smollm2"
    if (ref / "second_moment_layer6.safetensors").is_file() and hp.layers == [6]:
        stats = {6: load_file(str(ref / "second_moment_layer6.safetensors"))["C"]}
        templates = json.loads((ref / "context_templates.json").read_text())
        request = EditRequest.from_dict(json.loads((ref / "edits.json").read_text())["cases"][0]["request"])
    else:
        stats = second_moments(model, tok, hp.layers, n_tokens=hp.mom2_n_tokens)
        templates = None
        request = EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome")
    out = {}
    for fast in [True, False] if plain else [True]:
        runs = []
        for _ in range(reps if fast else 1):
            t = time.perf_counter()
            (res,) = compute_rome(
                model, tok, request, hp.replace(prefix_cache=fast), second_moment=stats, templates=templates
            ).details  # the one layer's keys, vectors, losses, timings
            runs.append({"total": time.perf_counter() - t, **res.timings, "steps": len(res.losses)})
        key = "fast" if fast else "plain"
        out[key] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(key, json.dumps(out[key]), flush=True)
    return out


def bench_stats(model, tok, tokens: int, layers: list[int]) -> dict:
    corpus = open_corpus()
    t = time.perf_counter()
    collect_second_moments(model, tok, layers, corpus, n_tokens=tokens, progress=False)
    one_pass = time.perf_counter() - t
    t = time.perf_counter()
    for layer in layers:
        collect_second_moments(model, tok, [layer], corpus, n_tokens=tokens, progress=False)
    per_layer = time.perf_counter() - t
    return {
        "layers": layers,
        "tokens": tokens,
        "one_pass_s": one_pass,
        "one_pass_tok_per_s": tokens / one_pass,
        "pass_per_layer_s": per_layer,
        "speedup": per_layer / one_pass,
        "single_layer6_tok_per_s": None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help="also time the plain (unoptimised) v* computation")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-edit", action="store_true")
    args = ap.parse_args()
    print(machine(), flush=True)
    result = {}
    if not args.skip_load:
        result["load"] = bench_load()
        print("load", json.dumps(result["load"]), flush=True)
    model, tok = load_model(document_start=False)  # as the official code tokenizes
    if not args.skip_edit:
        result["edit"] = bench_edit(model, tok, args.reps, args.plain)
    t = time.perf_counter()
    collect_second_moments(model, tok, [6], open_corpus(), n_tokens=args.stats_tokens, progress=False)
    single = time.perf_counter() - t
    result["stats"] = bench_stats(model, tok, args.stats_tokens, [4, 6, 8, 10])
    result["stats"]["single_layer6_tok_per_s"] = args.stats_tokens / single
    print("stats", json.dumps(result["stats"]), flush=True)


if __name__ == "__main__":
    main()
