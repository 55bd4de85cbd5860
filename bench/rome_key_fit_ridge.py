"""Choose ROME's ``key_fit_ridge`` from key geometry alone, on records after the evaluated ones.

With ``key_fit="every_template"`` ROME's left vector u is fitted so that every template's key gets
(nearly) the same share of the update; the ridge trades that fit against the update's C-norm (its
expected change on other keys). No edit is made and no score is read: for each record this computes
the keys and, for each ridge, the bare prompt's response kᵀu/k*ᵀu, the paraphrases' responses, and
the cost uᵀCu/(k*ᵀu)² relative to ROME's u = C⁻¹k*. The chosen ridge (0.01 on SmolLM2-135M, records
500-800) is the largest one at which no bare prompt's response is below 0.5.

    python bench/rome_key_fit_ridge.py --start 500 --n 300
"""

from __future__ import annotations

import argparse

from common import counterfact, machine

from factedit import load_model
from factedit.editing.keys import subject_keys
from factedit.editing.methods import get_method
from factedit.editing.resources import EditResources
from factedit.editing.rome import fitted_left_vector, left_vector
from factedit.models import arch_for


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", type=int, default=500, help="first record (past the evaluated ones)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--ridges", type=float, nargs="+", default=[1.0, 0.1, 0.03, 0.01, 0.003])
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    model, tok = load_model(args.model)
    arch = arch_for(model)
    hp = get_method("rome").hparams(model, None)
    moments, templates = EditResources(model, tok).for_hparams(hp, progress=True)
    layer = hp.layers[0]
    moment = moments[layer]
    settings: list[float | None] = [None, *args.ridges]  # None: ROME's u
    bare: dict = {s: [] for s in settings}
    para: dict = {s: [] for s in settings}
    cost: dict = {s: [] for s in settings}
    for case in counterfact(args.n, args.start):
        req = case.request
        keys = subject_keys(model, tok, arch, [layer], req.prompt, req.subject, templates, hp.fact_token)[layer]
        paraphrases = [
            subject_keys(model, tok, arch, [layer], p.replace(req.subject, "{}", 1), req.subject, ["{}"])[layer][0]
            for p in case.paraphrase_prompts
            if req.subject in p
        ]
        k_star = keys.mean(0).double()
        rome_cost = None
        for s in settings:
            u = (left_vector(keys.mean(0), moment) if s is None else fitted_left_vector(keys, moment, s)).double()
            scale = u @ k_star
            c = float(u @ moment.double() @ u / scale**2)
            rome_cost = rome_cost or c
            bare[s].append(float(keys[0].double() @ u / scale))
            para[s] += [float(p.double() @ u / scale) for p in paraphrases]
            cost[s].append(c / rome_cost)
    print(f"records {args.start}..{args.start + args.n}, layer {layer}, {len(templates)} templates")
    print(
        "| u | bare p2 | bare p5 | bare median | bare < 0.5 | paraphrase p5 | paraphrase median "
        "| cost median | cost p95 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in settings:
        b = bare[s]
        print(
            f"| {'ROME C⁻¹k*' if s is None else f'fitted, ridge {s:g}'} | {quantile(b, 0.02):.2f} | "
            f"{quantile(b, 0.05):.2f} | {quantile(b, 0.5):.2f} | {sum(x < 0.5 for x in b) / len(b):.3f} | "
            f"{quantile(para[s], 0.05):.2f} | {quantile(para[s], 0.5):.2f} | {quantile(cost[s], 0.5):.2f} | "
            f"{quantile(cost[s], 0.95):.2f} |"
        )


if __name__ == "__main__":
    main()
