"""NAS's norm anchor on the default model: the upper-trimmed mean |v*| of 1,000 CounterFact rewrites (seed 0)
solved at MEMIT's z layer with MEMIT's settings, as the official NAS code measures it (docs/methods.md).

    python bench/nas_anchor.py [--n 1000] [--seed 0] [--out state/scaling_2000/nas_anchor.json]

Prints the anchor and writes it with the sample size, the trimmed and refused counts and the machine, so the
sequential runs with ``--set value_norm_anchor=<anchor>`` can name where their number came from.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from common import machine

from factedit import load_model
from factedit.data import load_counterfact
from factedit.editing.hparams import MEMITHyperParams
from factedit.editing.values import reference_value_norm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    model, tok = load_model()
    requests = random.Random(args.seed).sample([c.request for c in load_counterfact().cases], args.n)
    hp = MEMITHyperParams.for_model(model)
    layer = hp.layers[-1]
    started = time.perf_counter()
    ref = reference_value_norm(model, tok, requests, hp, layer=layer, progress=True)
    result = {
        "anchor": ref.anchor,
        "layer": layer,
        "n": args.n,
        "seed": args.seed,
        "dropped": ref.dropped,
        "refused": ref.refused,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
