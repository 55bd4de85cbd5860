"""Benchmark one batch of CounterFact edits: wall time with a breakdown (z, keys, solve), the batched-z
speed-up over one request at a time, and the edit's scores.

    python bench/bench_memit.py --n 1000 [--compare-z 32] [--method memit|alphaedit|emmet|ultraedit] [--set K=V]
    python bench/bench_memit.py --n 1000 --turns 10 --method ultraedit   # 10 sequential batches of 100

Statistics are computed (or read from the cache) before timing starts. With ``--turns K`` the requests
are edited as K consecutive batches, each computed on the model the earlier ones left (UltraEdit's lifelong
protocol; its statistics carry over), and the scored records are those of the first turn: the edits the
later turns could have overwritten.
"""

from __future__ import annotations

import argparse
import json
import time

from common import counterfact, machine, score_case

from factedit import load_model
from factedit.cli.options import parse_overrides
from factedit.editing.methods import batch_method_names, get_method
from factedit.editing.resources import EditResources
from factedit.editing.sequential import SequentialEditor
from factedit.editing.values import build_value_problem, optimize_values
from factedit.models import arch_for
from factedit.text import pad_id


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--method", default="memit", choices=batch_method_names())
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hyper-parameter override")
    ap.add_argument("--start", type=int, default=0, help="skip this many CounterFact dev records first")
    ap.add_argument("--compare-z", type=int, default=0, help="time z for this many requests batched vs alone")
    ap.add_argument("--score", type=int, default=100, help="score this many of the edited records")
    ap.add_argument("--turns", type=int, default=1, help="edit the requests as this many consecutive batches")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    model, tok = load_model()
    method = get_method(args.method)
    hp = method.hparams(model, None, parse_overrides(args.set) or None)
    resources = EditResources(model, tok)
    _, templates = resources.for_hparams(hp, progress=True)  # statistics and templates before timing starts
    records = counterfact(args.n, start=args.start)
    requests = [case.request for case in records]
    result: dict = {
        "method": args.method,
        "n": len(requests),
        "start": args.start,
        "layers": hp.layers,
        "overrides": args.set,
        "turns": args.turns,
        "machine": machine(),
    }

    if args.compare_z and method.name != "ultraedit":  # UltraEdit optimises no z
        arch = arch_for(model)
        problems = [build_value_problem(tok, r, templates, hp.fact_token) for r in requests[: args.compare_z]]
        kw = dict(site=arch.block(hp.layers[-1]), layer=hp.layers[-1], hparams=hp, pad=pad_id(tok))
        t = time.perf_counter()
        for i in range(0, len(problems), hp.batch_size):
            optimize_values(model, arch, problems[i : i + hp.batch_size], **kw)
        batched = time.perf_counter() - t
        t = time.perf_counter()
        for p in problems:
            optimize_values(model, arch, [p], **kw)
        alone = time.perf_counter() - t
        result["z_compare"] = {
            "requests": len(problems),
            "batched_s": batched,
            "one_at_a_time_s": alone,
            "speedup": alone / batched,
        }
        print("z", json.dumps(result["z_compare"]), flush=True)

    scored = records[: args.score]
    pre = [score_case(model, tok, case) for case in scored]
    t = time.perf_counter()
    if args.turns > 1:
        editor = SequentialEditor(model, tok, method, hp, resources=resources, progress=True)
        editor.run(requests, batch_size=-(-len(requests) // args.turns))
        result["wall_s"] = time.perf_counter() - t
        result["breakdown_s"] = {
            key: sum(r.timings.get(key, 0.0) for r in editor.results) for key in editor.results[0].timings
        }
        revert = editor.stack.revert_all
    else:
        edit = method.compute(model, tok, requests, hp, resources=resources, progress=True)
        result["wall_s"] = time.perf_counter() - t
        result["breakdown_s"] = edit.timings
        revert = edit.patch.apply(model).revert
    print("edit", json.dumps({k: result[k] for k in ("n", "wall_s", "breakdown_s")}), flush=True)
    post = [score_case(model, tok, case) for case in scored]
    revert()
    for name, rows in (("pre", pre), ("post", post)):
        es = 100 * sum(r["rewrite"] for r in rows) / len(rows)
        ps = 100 * sum(r["paraphrase"] / r["n_paraphrase"] for r in rows) / len(rows)
        ns = 100 * sum(r["neighbourhood_kept"] / r["n_neighbourhood"] for r in rows) / len(rows)
        result[name] = {"ES": es, "PS": ps, "NS": ns, "records": len(rows)}
        print(name, json.dumps(result[name]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
