"""Why does ROME (r-ROME key) miss some rewrite prompts? Compare the bare prompt's key with k*.

    python bench/rome_key_projection.py runs/counterfact_rome [--limit N] [--ids 9 598 ...]

Both averages of k* are measured side by side: every template alike (official ROME, the bare prompt
is 1 of 21) and every context type alike (official MEMIT's compute_ks, the bare prompt 1 of 3),
and, third, the left vector fitted to every template's key (``key_fit="every_template"``).

r-ROME writes the rank-one update for k* (the key averaged over the context templates); a prompt
whose key k has a smaller projection kᵀu than k*ᵀu receives only that fraction of the change.
For every case of the run this prints the ratio kᵀu / k*ᵀu for the bare rewrite prompt ("{}"
template) and the position of the subject's last token, and compares cases whose rewrite
prompt failed (new target not preferred after the edit) with those that succeeded.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import machine

from factedit import load_model
from factedit.data import load_dataset
from factedit.editing.keys import subject_keys
from factedit.editing.methods import get_method
from factedit.editing.resources import EditResources
from factedit.editing.rome import average_key, fitted_left_vector, left_vector
from factedit.evaluation.metrics import counterfact_case_scores
from factedit.evaluation.records import CASES, CaseLog, read_manifest
from factedit.models import arch_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--ids", nargs="*", default=None, help="only these case ids (e.g. the failed ones)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine(), flush=True)
    manifest = read_manifest(args.run)
    rows = [r for r in CaseLog(Path(args.run) / CASES).load(repair=False).values() if "post" in r][: args.limit]
    if args.ids:
        rows = [r for r in rows if str(r["case_id"]) in set(args.ids)]
    failed = {str(r["case_id"]) for r in rows if counterfact_case_scores(r["post"])["rewrite_success"] < 1}
    model, tok = load_model()
    rome = manifest["method"] in ("rome", "rome-original")  # the run's own settings, else ROME's defaults
    method = get_method(manifest["method"] if rome else "rome")
    hp, arch = method.hparams(model, manifest["hparams"] if rome else None), arch_for(model)
    moments, templates = EditResources(model, tok).for_hparams(hp, progress=True)
    layer = hp.layers[0]
    data = load_dataset(manifest["dataset"]["name"], n=manifest["selection"]["n"])
    cases = {str(c.case_id): c for c in data.cases}
    ratios = {True: [], False: []}
    by_type = {True: [], False: []}
    fitted = {True: [], False: []}
    for r in rows:
        req = cases[str(r["case_id"])].request
        keys = subject_keys(model, tok, arch, [layer], req.prompt, req.subject, templates, hp.fact_token)[layer]
        u = left_vector(keys.mean(0), moments[layer])
        bare = float(keys[0] @ u / (keys.mean(0) @ u))
        k_types = average_key(keys, templates, hp.replace(key_average="context_types"))
        u_types = left_vector(k_types, moments[layer])
        bare_types = float(keys[0] @ u_types / (k_types @ u_types))
        u_fit = fitted_left_vector(keys, moments[layer], hp.key_fit_ridge)
        bare_fit = float(keys[0] @ u_fit / (keys.mean(0) @ u_fit))
        subject_end = len(tok(req.prompt.split("{}")[0] + req.subject)["input_ids"]) - 1
        is_failed = str(r["case_id"]) in failed
        ratios[is_failed].append(bare)
        by_type[is_failed].append(bare_types)
        fitted[is_failed].append(bare_fit)
        if is_failed:
            print(
                f"failed case {r['case_id']}: {req.prompt.format(req.subject)!r} -> {req.target_new!r}: "
                f"kᵀu/k*ᵀu = {bare:.3f} (per context type: {bare_types:.3f}, fitted u: {bare_fit:.3f}), "
                f"subject's last token at position "
                f"{subject_end}"
            )
    tables = (
        ("every template alike", ratios),
        ("every context type alike", by_type),
        (f"u fitted to every template (ridge {hp.key_fit_ridge:g})", fitted),
    )
    for name, table in tables:
        for is_failed, values in table.items():
            if values:
                print(
                    f"{name}: {'failed' if is_failed else 'succeeded'}: {len(values)} cases, median ratio "
                    f"{statistics.median(values):.3f}, share below 0.5: "
                    f"{sum(v < 0.5 for v in values) / len(values):.3f}"
                )


if __name__ == "__main__":
    main()
