"""Benchmark: attribution-patching traces (``method="attribution"``) against exact ones over many known facts.

    python bench/bench_atp.py [--n 200] [--out out/bench_atp] [--verify 10] [--threads 1] [--model NAME]
    python bench/bench_atp.py --n 200 --sample 8 --threads 2 --out out/bench_atp_timing   # timing on a seeded mix
    python bench/bench_atp.py --out out/bench_atp --summary-only [--markdown]

For each of the first ``--n`` known facts the model predicts, in one process and in this order: the
exact trace (fast runner), the estimated one, the estimated one with ``--verify`` cells re-patched per
kind; hidden states, MLP and attention, window 10, the default noise, samples and seed. Each fact's line
(agreement per kind, wall/CPU seconds of the three runs, the exact and estimated maps) is appended to
``<out>/facts.jsonl`` when the fact is done, so an interrupted run resumes where it stopped (facts
already there are skipped). The summary (``<out>/summary.json`` and printed):

* per kind, over the facts: Spearman correlation and top-10 overlap of the estimated and the exact
  map, over the cells at or after the subject's first token (before it both are the corrupted score);
  and the certificate's own figures (Spearman and top-K overlap at the re-patched cells only);
* the peak (token bucket, layer) of the averaged indirect effects, estimated against exact, per kind;
* wall time per fact of the three runs, medians and speed-ups per process that timed at least 3 facts
  (each fact records its torch thread count; ``timing`` is the process that timed the most); the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine

from factedit import load_model
from factedit.models.fingerprint import model_fingerprint
from factedit.paths import atomic_write_bytes
from factedit.progress import as_progress
from factedit.tracing import KINDS, causal_trace, load_known_facts
from factedit.tracing.attribution import spearman, top_overlap
from factedit.tracing.dataset import bucket_rows, known_selection, read_jsonl, summarize

log = logging.getLogger("bench_atp")
FACTS = "facts.jsonl"
RUNS = ("exact", "approx", "approx_verify")


def append_line(path: Path, record: dict[str, Any]) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):  # a torn last line: cut it so the new one starts on its own
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def map_agreement(exact: np.ndarray, estimated: np.ndarray, first: int, k: int = 10) -> dict[str, float | None]:
    """Spearman and top-k overlap of two (tokens, layers) maps over the cells from token ``first`` on."""
    ok = np.isfinite(exact) & np.isfinite(estimated)
    ok[:first] = False
    x, y = exact[ok], estimated[ok]
    rho = spearman(y, x)
    overlap = top_overlap(y, x, k)
    return {
        "spearman": None if not np.isfinite(rho) else rho,
        "top_overlap": None if not np.isfinite(overlap) else overlap,
        "max_abs_error": float(np.max(np.abs(x - y))) if len(x) else None,
        "cells": int(ok.sum()),
    }


def trace_fact(model, tok, fact, args, session: str) -> dict[str, Any]:
    kw = dict(kinds=KINDS, samples=args.samples, window=10, seed=1, batch_size=args.batch_size)
    runs = {
        "exact": lambda: causal_trace(model, tok, fact.prompt, fact.subject, method="fast", **kw),
        "approx": lambda: causal_trace(model, tok, fact.prompt, fact.subject, method="attribution", **kw),
        "approx_verify": lambda: causal_trace(
            model, tok, fact.prompt, fact.subject, method="attribution", verify=args.verify, **kw
        ),
    }
    results, seconds = {}, {}
    for name in RUNS:
        results[name], wall, cpu = timed(runs[name])
        seconds[name] = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4)}
    exact, approx, verified = results["exact"], results["approx"], results["approx_verify"]
    first = exact.subject_range[0]
    record: dict[str, Any] = {
        "known_id": fact.known_id,
        "subject": fact.subject,
        "prompt": fact.prompt,
        "session": session,
        "threads": torch.get_num_threads(),
        "tokens": exact.tokens,
        "subject_range": list(exact.subject_range),
        "answer": exact.answer,
        "clean_prob": exact.clean_prob,
        "low_prob": exact.low_prob,
        "seconds": seconds,
        "map": {k: map_agreement(exact.effects(k), approx.effects(k), first) for k in KINDS},
        "certificate": {
            k: {m: verified.certificate[k][m] for m in ("k", "n_random", "spearman", "top_k_overlap", "max_abs_error")}
            for k in KINDS
        },
        "exact_scores": exact.to_dict()["scores"],
        "approx_scores": approx.to_dict()["scores"],
    }
    return record


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def session_timing(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and speed-ups of the facts one process timed (ratios only mean something within one)."""
    med = {
        run: {unit: _median([r["seconds"][run][unit] for r in rows]) for unit in ("wall_s", "cpu_s")} for run in RUNS
    }
    ratios = [r["seconds"]["exact"]["wall_s"] / r["seconds"]["approx"]["wall_s"] for r in rows]
    ratios_v = [r["seconds"]["exact"]["wall_s"] / r["seconds"]["approx_verify"]["wall_s"] for r in rows]
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    return {
        "facts_timed_in_one_process": len(rows),
        "torch_threads": threads[0] if len(threads) == 1 else (threads or None),
        "medians": med,
        "speedup_wall_of_medians": {
            "approx": med["exact"]["wall_s"] / med["approx"]["wall_s"] if rows else None,
            "approx_verify": med["exact"]["wall_s"] / med["approx_verify"]["wall_s"] if rows else None,
        },
        "speedup_wall_median_per_fact": {"approx": _median(ratios), "approx_verify": _median(ratios_v)},
    }


def summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement per kind, AIE peaks estimated against exact, and timing medians."""
    out: dict[str, Any] = {"facts": len(lines), "kinds": {}}
    for kind in KINDS:
        maps = [r["map"][kind] for r in lines]
        certs = [r["certificate"][kind] for r in lines]
        out["kinds"][kind] = {
            "map_spearman": {
                "median": _median([m["spearman"] for m in maps]),
                "mean": _mean([m["spearman"] for m in maps]),
            },
            "map_top10_overlap": {
                "median": _median([m["top_overlap"] for m in maps]),
                "mean": _mean([m["top_overlap"] for m in maps]),
            },
            "map_max_abs_error_median": _median([m["max_abs_error"] for m in maps]),
            "certificate_spearman_median": _median([c["spearman"] for c in certs]),
            "certificate_top_k_overlap_mean": _mean([c["top_k_overlap"] for c in certs]),
        }
    base = [{k: r[k] for k in ("subject_range", "clean_prob", "low_prob")} for r in lines]
    exact = summarize([{**b, "scores": r["exact_scores"]} for b, r in zip(base, lines, strict=True)]).peaks()
    approx = summarize([{**b, "scores": r["approx_scores"]} for b, r in zip(base, lines, strict=True)]).peaks()
    out["aie_peaks"] = {
        kind: {
            "exact": {key: exact[kind][key] for key in ("bucket", "layer", "mean")},
            "approx": {key: approx[kind][key] for key in ("bucket", "layer", "mean")},
            "same_peak": (exact[kind]["bucket"], exact[kind]["layer"])
            == (approx[kind]["bucket"], approx[kind]["layer"]),
            "last_subject_token_layer": {
                "exact": exact[kind]["per_bucket"].get("last subject token", {}).get("layer"),
                "approx": approx[kind]["per_bucket"].get("last subject token", {}).get("layer"),
            },
        }
        for kind in KINDS
    }
    out["errors"] = error_by_place(lines)
    sessions: dict[str, list[dict[str, Any]]] = {}
    for r in lines:
        sessions.setdefault(r["session"], []).append(r)
    per_session = {name: session_timing(rows) for name, rows in sessions.items() if len(rows) >= 3}
    timed = max(sessions, key=lambda name: len(sessions[name])) if sessions else None
    out["timing"] = session_timing(sessions[timed]) if timed else session_timing([])
    out["timing"]["session"] = timed
    out["timing_per_session"] = per_session
    return out


def error_by_place(lines: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Where the estimate misses, per kind and token bucket: over facts, the mean signed and absolute error
    (estimated minus exact score) and the mean absolute exact effect, in thirds of the depth, with the
    layer of the largest mean absolute error. Buckets as in the averaged effects (paper Fig. 2)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in KINDS:
        err: dict[str, list[np.ndarray]] = {}
        eff: dict[str, list[np.ndarray]] = {}
        for r in lines:
            exact = np.asarray(r["exact_scores"][kind], dtype=float)
            approx = np.asarray(r["approx_scores"][kind], dtype=float)
            for bucket, row in bucket_rows(approx - exact, r["subject_range"]).items():
                err.setdefault(bucket, []).append(row)
            for bucket, row in bucket_rows(np.abs(exact - r["low_prob"]), r["subject_range"]).items():
                eff.setdefault(bucket, []).append(row)
        out[kind] = {}
        for bucket, rows in err.items():
            e, x = np.stack(rows), np.stack(eff[bucket])  # (facts, layers)
            thirds = np.array_split(np.arange(e.shape[1]), 3)
            abs_by_layer = np.nanmean(np.abs(e), axis=0)
            out[kind][bucket] = {
                "facts": int(e.shape[0]),
                "worst_layer": int(np.nanargmax(abs_by_layer)),
                "thirds": [
                    {
                        "layers": [int(t[0]), int(t[-1])],
                        "mean_error": float(np.nanmean(e[:, t])),
                        "mean_abs_error": float(np.nanmean(np.abs(e[:, t]))),
                        "mean_abs_effect": float(np.nanmean(x[:, t])),
                    }
                    for t in thirds
                ],
            }
    return out


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def print_summary(s: dict[str, Any], verify: int, where: str) -> None:
    print(f"\n{s['facts']} facts ({where})")
    print(f"{'kind':8s} {'Spearman med/mean':>18s} {'top-10 overlap med/mean':>24s} {'cert. Spearman':>15s} "
          f"{'cert. top-' + str(verify):>14s}")  # fmt: skip
    for kind, k in s["kinds"].items():
        print(
            f"{kind:8s} {_fmt(k['map_spearman']['median'])} / {_fmt(k['map_spearman']['mean']):>7s}"
            f"   {_fmt(k['map_top10_overlap']['median']):>10s} / {_fmt(k['map_top10_overlap']['mean']):>7s}"
            f"   {_fmt(k['certificate_spearman_median']):>12s}   {_fmt(k['certificate_top_k_overlap_mean']):>11s}"
        )
    print("averaged indirect effects, peak (bucket, layer): exact vs estimated")
    for kind, p in s["aie_peaks"].items():
        e, a = p["exact"], p["approx"]
        print(
            f"  {kind:7s} exact {e['bucket']!r} {e['layer']} ({e['mean']:.4f})  estimated {a['bucket']!r} "
            f"{a['layer']} ({a['mean']:.4f})  same: {p['same_peak']}; last subject token layer "
            f"{p['last_subject_token_layer']['exact']} vs {p['last_subject_token_layer']['approx']}"
        )
    print("estimate - exact, per token bucket and third of the depth: mean error / mean |error| (mean |effect|)")
    for kind, buckets in s["errors"].items():
        for bucket, b in buckets.items():
            cells = "  ".join(
                f"L{t['layers'][0]}-{t['layers'][1]}: {t['mean_error']:+.3f} / {t['mean_abs_error']:.3f} "
                f"({t['mean_abs_effect']:.3f})"
                for t in b["thirds"]
            )
            print(f"  {kind:7s} {bucket:24s} {cells}  worst layer {b['worst_layer']}")
    for name, t in s["timing_per_session"].items():
        m = t["medians"]
        threads = t["torch_threads"] if t["torch_threads"] is not None else "unrecorded"
        print(
            f"wall time per fact, medians of {t['facts_timed_in_one_process']} facts timed in process {name} "
            f"(torch threads: {threads}):"
        )
        for run in RUNS:
            print(f"  {run:14s} wall {_fmt(m[run]['wall_s'], '8.2f')}s  cpu {_fmt(m[run]['cpu_s'], '8.2f')}s")
        sp, sf = t["speedup_wall_of_medians"], t["speedup_wall_median_per_fact"]
        print(
            f"  speed-up (ratio of medians): approx {_fmt(sp['approx'], '.1f')}x, approx+verify {verify} "
            f"{_fmt(sp['approx_verify'], '.1f')}x; median per-fact ratio {_fmt(sf['approx'], '.1f')}x / "
            f"{_fmt(sf['approx_verify'], '.1f')}x"
        )


def print_markdown(s: dict[str, Any], verify: int) -> None:
    """The summary as the Markdown tables of docs/tracing.md, so the docs are regenerated, not retyped."""
    print(f"| kind | Spearman, estimated vs exact map (median / mean over {s['facts']} facts) | top-10 overlap "
          f"(median / mean) | certificate Spearman (median) | certificate top-{verify} overlap (mean) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for kind, k in s["kinds"].items():
        print(
            f"| {kind} | {_fmt(k['map_spearman']['median'])} / {_fmt(k['map_spearman']['mean'])} | "
            f"{_fmt(k['map_top10_overlap']['median'], '.2f')} / {_fmt(k['map_top10_overlap']['mean'], '.2f')} | "
            f"{_fmt(k['certificate_spearman_median'])} | {_fmt(k['certificate_top_k_overlap_mean'])} |"
        )
    print(f"\n| averaged indirect effect ({s['facts']} facts) | exact peak (bucket, layer) | estimated peak | "
          "same peak | at the last subject token: exact vs estimated layer |")  # fmt: skip
    print("|---|---|---|---|---|")
    for kind, p in s["aie_peaks"].items():
        e, a, last = p["exact"], p["approx"], p["last_subject_token_layer"]
        print(
            f"| {kind} | {e['bucket']}, {e['layer']} ({e['mean']:.3f}) | {a['bucket']}, {a['layer']} "
            f"({a['mean']:.3f}) | {'yes' if p['same_peak'] else 'no'} | {last['exact']} vs {last['approx']} |"
        )
    print("\n| process (facts timed, torch threads) | exact (fast) | estimated | estimated + verify "
          f"{verify} | speed-up, map | speed-up, map + verify |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, t in s["timing_per_session"].items():
        m, sp = t["medians"], t["speedup_wall_of_medians"]
        threads = t["torch_threads"] if t["torch_threads"] is not None else "1 (unrecorded)"
        cells = " | ".join(f"{_fmt(m[run]['wall_s'], '.2f')} s (CPU {_fmt(m[run]['cpu_s'], '.2f')} s)" for run in RUNS)
        print(
            f"| {name} ({t['facts_timed_in_one_process']}, {threads}) | {cells} | "
            f"{_fmt(sp['approx'], '.1f')}× | {_fmt(sp['approx_verify'], '.1f')}× |"
        )
    kinds = list(s["errors"])
    thirds = next(iter(next(iter(s["errors"].values())).values()))["thirds"]
    head = " | ".join(f"layers {t['layers'][0]}–{t['layers'][1]}" for t in thirds)
    print(f"\n| kind | token bucket | {head} | worst layer |")
    print("|---|---|" + "---:|" * len(thirds) + "---:|")
    for kind in kinds:
        for bucket, b in s["errors"][kind].items():
            cells = " | ".join(
                f"{t['mean_error']:+.3f} / {t['mean_abs_error']:.3f} ({t['mean_abs_effect']:.3f})" for t in b["thirds"]
            )
            print(f"| {kind} | {bucket} | {cells} | {b['worst_layer']} |")
    print("\n(error cells: mean signed error / mean absolute error (mean absolute exact effect), estimate minus exact)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="known facts the model predicts to trace")
    ap.add_argument(
        "--sample", type=int, default=None, help="trace only a seeded random sample of this many of the n facts"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample")
    ap.add_argument("--out", type=Path, default=Path("out/bench_atp"))
    ap.add_argument("--verify", type=int, default=10, help="cells per kind re-patched in the verified run")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--markdown", action="store_true", help="with --summary-only: the docs' Markdown tables")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", type=Path, default=None, help="known-facts file (default: known_1000.json)")
    ap.add_argument("--summary-only", action="store_true", help="only summarise the facts already in --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    facts_path = args.out / FACTS
    if args.summary_only:
        lines = read_jsonl(facts_path)
        if not lines:
            raise SystemExit(f"{facts_path} holds no facts yet")
        s = summary(lines)
        print_markdown(s, args.verify) if args.markdown else print_summary(s, args.verify, str(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    facts = load_known_facts(args.data)
    preds = known_selection(model, tok, facts, args.out, model_fingerprint(model), as_progress(None))
    by_id = {f.known_id: f for f in facts}
    chosen = [by_id[p["known_id"]] for p in preds if p["correct"]][: args.n]
    if args.sample is not None:  # a timing run over a mix of prompt lengths like the whole set's, in one process
        keep = np.random.default_rng(args.seed).choice(len(chosen), size=min(args.sample, len(chosen)), replace=False)
        chosen = [chosen[i] for i in sorted(keep)]
    done = {r["known_id"] for r in read_jsonl(facts_path)}
    todo = [f for f in chosen if f.known_id not in done]
    log.info("%d of %d facts to trace (%d done before)", len(todo), len(chosen), len(chosen) - len(todo))
    session = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"
    if todo:  # warm-up: the noise scale is computed (or read) once, the first forward pays its set-up
        causal_trace(model, tok, todo[0].prompt, todo[0].subject, kinds=["hidden"], samples=2, tokens=[-1], layers=[0])
    for i, fact in enumerate(todo):
        record = trace_fact(model, tok, fact, args, session)
        append_line(facts_path, record)
        sec = record["seconds"]
        log.info(
            "fact %d/%d (known %d): exact %.1fs, approx %.2fs, approx+verify %.1fs; Spearman %s",
            i + 1,
            len(todo),
            fact.known_id,
            sec["exact"]["wall_s"],
            sec["approx"]["wall_s"],
            sec["approx_verify"]["wall_s"],
            " ".join(f"{k}={_fmt(record['map'][k]['spearman'], '.2f')}" for k in KINDS),
        )
    lines = [r for r in read_jsonl(facts_path) if r["known_id"] in {f.known_id for f in chosen}]
    if not lines:
        raise SystemExit("no fact traced: the model predicts none of the known facts")
    s = summary(lines)
    s.update({"machine": machine(), "torch_threads": torch.get_num_threads(), "verify": args.verify, "n": args.n})
    atomic_write_bytes(args.out / "summary.json", json.dumps(s, indent=1).encode())
    print_summary(s, args.verify, str(facts_path))
    print(f"machine: {s['machine']}")


if __name__ == "__main__":
    main()
