"""Choose ROME's default layer for a model: edit CounterFact records at each candidate layer.

Uses records *after* the first 10 (those are the acceptance check), so the choice is not
tuned on the check. Statistics for all candidate layers come from one pass.

    python bench/rome_layer_sweep.py --layers 2 4 6 8 10 12 15 18 --n 20 --start 10
"""

from __future__ import annotations

import argparse
import json

from common import counterfact, machine, score_case

from factedit import load_model
from factedit.editing.methods import get_method
from factedit.editing.resources import EditResources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 15, 18])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--start", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(machine())
    model, tok = load_model(args.model)
    rome = get_method("rome")
    base = rome.hparams(model)
    resources = EditResources(model, tok)
    resources.second_moments(args.layers, base.stats_spec, progress=True)  # every candidate layer in one pass
    records = counterfact(args.n, args.start)
    pre = {}
    for record in records:  # the unedited model's scores: neighbourhood is judged against these
        for k, v in score_case(model, tok, record).items():
            pre[k] = pre.get(k, 0) + v
    print("unedited:", json.dumps(pre), flush=True)
    table = []
    for layer in args.layers:
        hp = rome.hparams(model, base, overrides={"layers": [layer]})
        tot = {}
        for record in records:
            handle = rome.compute(model, tok, [record.request], hp, resources=resources).patch.apply(model)
            for k, v in score_case(model, tok, record).items():
                tot[k] = tot.get(k, 0) + v
            handle.revert()
        row = {
            "layer": layer,
            "efficacy": tot["rewrite"] / len(records),
            "paraphrase": tot["paraphrase"] / tot["n_paraphrase"],
            "neighbourhood": tot["neighbourhood_kept"] / tot["n_neighbourhood"],
        }
        row["neighbourhood_drop"] = (pre["neighbourhood_kept"] - tot["neighbourhood_kept"]) / tot["n_neighbourhood"]
        row["score"] = 3 / sum(1 / max(row[k], 1e-9) for k in ("efficacy", "paraphrase", "neighbourhood"))
        table.append(row)
        print(json.dumps(row), flush=True)
    print("| layer | efficacy | paraphrase | neighbourhood (drop vs unedited) | harmonic mean |")
    print("|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['layer']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | {r['neighbourhood']:.2f} "
            f"({r['neighbourhood_drop']:+.2f}) | {r['score']:.3f} |"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
