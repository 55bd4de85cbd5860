"""Issue check: the first N CounterFact dev records, each edited alone from the unedited model.

Counts new-beats-true on the rewrite prompt and paraphrases, and true-beats-new on the
neighbourhood prompts, before and after each ROME edit (default hyper-parameters).

    python bench/counterfact10.py [--n 10] [--method rome|rome-original] [--layer L]
"""

from __future__ import annotations

import argparse
import json
import time

from common import counterfact, machine, score_case

from factedit import load_model
from factedit.editing.methods import get_method
from factedit.editing.resources import EditResources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--method", default="rome", choices=["rome", "rome-original"])
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--mom2-tokens", type=int, default=None, help="statistics sample size (default: hparams)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(machine())
    model, tok = load_model()
    changes = {}
    if args.layer is not None:
        changes["layers"] = [args.layer]
    if args.mom2_tokens is not None:
        changes["mom2_n_tokens"] = args.mom2_tokens
    method = get_method(args.method)  # rome-original: consistent_key off
    hp = method.hparams(model, overrides=changes)
    resources = EditResources(model, tok)
    resources.for_hparams(hp, progress=True)  # statistics and templates before timing starts
    totals = {"pre": {}, "post": {}}
    rows, seconds = [], []
    for case in counterfact(args.n, args.start):
        request = case.request
        pre = score_case(model, tok, case)
        started = time.perf_counter()
        patch = method.compute(model, tok, [request], hp, resources=resources).patch
        seconds.append(time.perf_counter() - started)
        handle = patch.apply(model)
        post = score_case(model, tok, case)
        handle.revert()
        rows.append({"case_id": case.case_id, "pre": pre, "post": post, "seconds": seconds[-1]})
        for phase, s in (("pre", pre), ("post", post)):
            for k, v in s.items():
                totals[phase][k] = totals[phase].get(k, 0) + v
        print(case.case_id, request.text, "->", request.new_text, "post:", post, f"{seconds[-1]:.1f}s", flush=True)
    for phase in ("pre", "post"):
        t = totals[phase]
        print(
            f"{phase}: rewrite new>true {t['rewrite']}/{args.n}; paraphrase new>true "
            f"{t['paraphrase']}/{t['n_paraphrase']}; neighbourhood true>new "
            f"{t['neighbourhood_kept']}/{t['n_neighbourhood']}"
        )
    seconds.sort()
    print(
        f"method {args.method}, layer {hp.layers}, statistics {hp.mom2_n_tokens} tokens; "
        f"median edit time {seconds[len(seconds) // 2]:.1f}s"
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"method": args.method, "layers": hp.layers, "totals": totals, "cases": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
