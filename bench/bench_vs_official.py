"""factedit against the official ROME and MEMIT code, side by side in one process on one model.

    OMP_WAIT_POLICY=PASSIVE ../official/.venv/bin/python bench/bench_vs_official.py \\
        [--official-rome ../official/rome] [--official-memit ../official/memit] [--threads 1] \\
        [--part rome|memit|both] [--cases 3 5 9] [--reps 3] [--memit-batch 32] [--out result.json]

Run it with the venv bench/official/setup.py makes (it imports both the official code and factedit).
Run it with OMP_WAIT_POLICY=PASSIVE, or at one thread: with OpenMP's default (active) waiting, the
threads of one side keep spinning after its call and slow the other side's.

ROME: for each case of the reference (``edits.json`` case ids) and each repetition, the official
``rome.rome_main.execute_rome`` (computes u and v on the model and restores the weights) and factedit's
``compute_rome`` in original-ROME mode (never changes the model) run one after the other, the first of
each pair alternating, each from the unedited model, with the reference C (put into the official
statistics cache as count 1, mom2 = C, so its ``get_inv_cov`` inverts C itself) and the reference
templates. Both sides' u and v are checked against the reference vectors (cosine). The figure is the
median of the per-pair ratios official / factedit.

MEMIT: the z vectors of ``--memit-batch`` CounterFact dev records (from ``--memit-start``): the official
``memit.compute_z.compute_z`` once per request, in order (as its ``execute_memit``), against factedit's
batched value optimisation (``optimize_values``, as ``compute_memit`` calls it, ``batch_size`` requests
at once), with the same templates (factedit's MEMIT templates for the default model) and settings
(factedit's MEMIT defaults mapped onto the official fields, :func:`official_memit_hparams`). z needs no
statistics on either side. Reported: seconds, ratio, and how close the two sides' z are.

Torch's downloads are refused while the official code runs (it would try rome.baulab.info).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import data_dir, machine
from safetensors.torch import load_file

from factedit import EditRequest, MEMITHyperParams, ROMEHyperParams, compute_rome, load_model
from factedit.editing.resources import EditResources
from factedit.editing.values import build_value_problem, optimize_values
from factedit.models import arch_for
from factedit.text import pad_id

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("FACTEDIT_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
OFFICIAL = Path(os.environ.get("FACTEDIT_OFFICIAL_DIR", Path(__file__).resolve().parents[2] / "official"))
# Module names of the packages both official trees define (ROME's are dropped before MEMIT's load).
OFFICIAL_PACKAGES = ("rome", "util", "memit", "experiments", "dsets", "baselines")
_OFFICIAL_PATHS: set[str] = set()  # official trees put on sys.path


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _refuse_download(url: str, *args, **kwargs) -> None:
    raise RuntimeError(f"download refused (bench_vs_official): {url}")


def import_official(folder: Path, modules: list[str]) -> SimpleNamespace:
    """Import ``modules`` from an official tree. Its ``util.globals`` reads ``globals.yml`` from the working
    folder and its statistics folder is relative, so the process works in ``folder`` from here on."""
    for name in list(sys.modules):
        if name.split(".")[0] in OFFICIAL_PACKAGES:
            del sys.modules[name]  # the other tree's packages of the same names
    sys.path[:] = [p for p in sys.path if p not in _OFFICIAL_PATHS]
    _OFFICIAL_PATHS.add(str(folder))
    sys.path.insert(0, str(folder))
    os.chdir(folder)
    torch.hub.download_url_to_file = _refuse_download
    return SimpleNamespace(**{m.replace(".", "_"): importlib.import_module(m) for m in modules})


def quiet_call(fn, *args, **kwargs):
    """Call ``fn`` with its prints (the official code prints every step) kept out of the figures."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            return fn(*args, **kwargs)
    except Exception:
        print(buf.getvalue()[-4000:], file=sys.stderr)
        raise


def tree_state() -> dict:
    """Which factedit is measured: the commit and ``git diff --stat`` of the working tree (read only)."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()

    diff = subprocess.run(["git", "-C", str(REPO), "diff"], capture_output=True).stdout
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "diff_stat": git("diff", "--stat"),
        "diff_sha256": hashlib.sha256(diff).hexdigest()[:16],  # tells two runs' working trees apart
        "untracked": git("ls-files", "--others", "--exclude-standard"),
    }


# ---------------------------------------------------------------- ROME


def seed_official_stats(off: SimpleNamespace, model, hparams, layer: int, C: torch.Tensor) -> Path:
    """Write C into the official statistics cache (count 1, mom2 = C: ``moment()`` returns C bit for bit),
    with the official code's own writer, where its ``layer_stats`` looks for it."""
    rs = off.util_runningstats
    model_name = model.config._name_or_path.replace("/", "_")
    layer_name = hparams.rewrite_module_tmp.format(layer)
    path = (
        Path(off.util_globals.STATS_DIR)
        / model_name
        / f"{hparams.mom2_dataset}_stats"
        / f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz"
    )
    stat = rs.CombinedStat(mom2=rs.SecondMoment())
    stat.mom2.count = 1
    stat.mom2.mom2 = C.clone()
    rs.save_cached_state(str(path), stat, {"sample_size": hparams.mom2_n_samples})
    return path.resolve()


def bench_rome(model, tok, args) -> dict:
    ref_dir = REFERENCE / "rome_official_smollm2"
    edits = json.loads((ref_dir / "edits.json").read_text())
    C = load_file(str(ref_dir / "second_moment_layer6.safetensors"))["C"]
    templates = json.loads((ref_dir / "context_templates.json").read_text())
    vectors = load_file(str(ref_dir / "rome_vectors.safetensors"))
    cases = {c["case_id"]: c for c in edits["cases"]}
    missing = [c for c in args.cases if c not in cases]
    if missing:
        raise SystemExit(f"cases {missing} are not in edits.json (it has {sorted(cases)})")

    off = import_official(args.official_rome, ["rome.rome_main", "rome.compute_u", "util.runningstats", "util.globals"])
    off_hp = off.rome_rome_main.ROMEHyperParams(**edits["hparams"])
    (layer,) = off_hp.layers
    stats_file = seed_official_stats(off, model, off_hp, layer, C)
    off.rome_compute_u.inv_mom2_cache.clear()  # the first official edit reads the file and inverts C
    off.rome_rome_main.CONTEXT_TEMPLATES_CACHE = list(templates)
    fe_hp = ROMEHyperParams.for_model(model, consistent_key=False, key_fit="mean")
    if fe_hp.layers != [layer]:
        raise SystemExit(f"factedit's ROME layer {fe_hp.layers} is not the reference's {layer}")
    weight = dict(model.named_parameters())[f"{off_hp.rewrite_module_tmp.format(layer)}.weight"]
    original = weight.detach().clone()
    print(f"official ROME: {args.official_rome}; statistics cache {stats_file}", flush=True)

    def official(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = quiet_call(off.rome_rome_main.execute_rome, model, tok, copy.deepcopy(case["request"]), off_hp)
        ((u, v),) = deltas.values()
        return u, v

    def factedit(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
        request = EditRequest.from_dict(case["request"])
        (res,) = compute_rome(model, tok, request, fe_hp, second_moment={layer: C}, templates=templates).details
        return res.u, res.v

    sides = {"official": official, "factedit": factedit}
    pairs = []
    for rep in range(args.reps):
        for cid in args.cases:
            order = ["official", "factedit"] if len(pairs) % 2 == 0 else ["factedit", "official"]
            row: dict = {"case": cid, "rep": rep, "first": order[0]}
            for side in order:
                t = time.perf_counter()
                u, v = sides[side](cases[cid])
                row[f"{side}_s"] = time.perf_counter() - t
                row[f"{side}_cos_u"] = _cos(u, vectors[f"case{cid}.u"])
                row[f"{side}_cos_v"] = _cos(v, vectors[f"case{cid}.v"])
                if not torch.equal(weight, original):
                    raise SystemExit(f"{side} left the rewrite weight changed (case {cid})")
            row["ratio"] = row["official_s"] / row["factedit_s"]
            pairs.append(row)
            print(
                f"case {cid} rep {rep} ({row['first']} first): official {row['official_s']:.2f} s, "
                f"factedit {row['factedit_s']:.2f} s, ratio {row['ratio']:.2f}x | cos(u), cos(v): official "
                f"{row['official_cos_u']:.6f} {row['official_cos_v']:.6f}, factedit "
                f"{row['factedit_cos_u']:.6f} {row['factedit_cos_v']:.6f}",
                flush=True,
            )
    summary = {
        "pairs": len(pairs),
        "median_pair_ratio": statistics.median(r["ratio"] for r in pairs),
        "median_official_s": statistics.median(r["official_s"] for r in pairs),
        "median_factedit_s": statistics.median(r["factedit_s"] for r in pairs),
        "min_cos": min(r[f"{s}_cos_{x}"] for r in pairs for s in sides for x in "uv"),
    }
    print(
        f"ROME: median pair ratio {summary['median_pair_ratio']:.2f}x over {len(pairs)} pairs (median official "
        f"{summary['median_official_s']:.2f} s, factedit {summary['median_factedit_s']:.2f} s); "
        f"min cos over both sides {summary['min_cos']:.6f}",
        flush=True,
    )
    return {"hparams": edits["hparams"], "cases": args.cases, "reps": args.reps, "rows": pairs, **summary}


# ---------------------------------------------------------------- MEMIT z


def official_memit_hparams(off: SimpleNamespace, model, hp: MEMITHyperParams) -> object:
    """factedit's MEMIT settings as the official ``MEMITHyperParams``.

    The loss is read at the last block (``v_loss_layer``) through the final norm and the LM head, which is
    the model's output, as factedit's; SmolLM2 ties the LM head to the embedding, which is then the only
    such parameter (``lm_head.weight`` is not among ``named_parameters()``), so ``lm_head_module`` names the
    embedding (no bias: the official code uses zeros). The statistics fields are not read by ``compute_z``.
    """
    return off.memit_memit_hparams.MEMITHyperParams(
        layers=list(hp.layers),
        layer_selection="all",
        fact_token=hp.fact_token,
        v_num_grad_steps=hp.v_num_grad_steps,
        v_lr=hp.v_lr,
        v_loss_layer=model.config.num_hidden_layers - 1,
        v_weight_decay=hp.v_weight_decay,
        clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor,
        mom2_adjustment=True,
        mom2_update_weight=hp.mom2_update_weight,
        rewrite_module_tmp="model.layers.{}.mlp.down_proj",
        layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp",
        attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm",
        lm_head_module="model.embed_tokens",
        mom2_dataset="wikivital_first100k",
        mom2_n_samples=hp.mom2_n_tokens,
        mom2_dtype=hp.mom2_dtype,
    )


def bench_memit(model, tok, args) -> dict:
    records_file = data_dir() / "counterfact" / "counterfact_dev.json"
    records = json.loads(records_file.read_text())[args.memit_start : args.memit_start + args.memit_batch]
    hp = MEMITHyperParams.for_model(model)
    if hp.early_stop_loss != 5e-2 or not hp.prefix_cache or hp.value_norm_anchor is not None:
        raise SystemExit("factedit's MEMIT defaults changed: check the mapping onto the official settings")
    templates = EditResources(model, tok).templates(hp.template_spec)
    z_layer = hp.layers[-1]
    off = import_official(args.official_memit, ["memit.compute_z", "memit.memit_hparams"])
    off_hp = official_memit_hparams(off, model, hp)
    # compute_z flattens its templates: the grouping ([["{}"], generated], as MEMIT's cache) does not matter
    off_templates = [templates[:1], templates[1:]] if templates[0] == "{}" else [templates]
    print(
        f"official MEMIT: {args.official_memit}; {len(records)} CounterFact dev records {args.memit_start}.."
        f"{args.memit_start + len(records) - 1} of {records_file} (case ids {records[0]['case_id']}.."
        f"{records[-1]['case_id']}); z at layer {z_layer}; {len(templates)} templates",
        flush=True,
    )

    def official() -> torch.Tensor:
        zs = []
        for record in records:  # as execute_memit: a leading space on the target, one request at a time
            request = copy.deepcopy(record["requested_rewrite"])
            if request["target_new"]["str"][0] != " ":
                request["target_new"]["str"] = " " + request["target_new"]["str"]
            zs.append(quiet_call(off.memit_compute_z.compute_z, model, tok, request, off_hp, z_layer, off_templates))
        return torch.stack([z.detach() for z in zs])

    def factedit() -> torch.Tensor:
        arch = arch_for(model)
        requests = [EditRequest.from_dict(r) for r in records]
        problems = [build_value_problem(tok, r, templates, hp.fact_token) for r in requests]
        zs = []
        for i in range(0, len(problems), hp.batch_size):  # as compute_memit's z stage
            values = optimize_values(
                model, arch, problems[i : i + hp.batch_size], site=arch.block(z_layer), layer=z_layer,
                hparams=hp, pad=pad_id(tok),
            )  # fmt: skip
            zs.append(values.targets.detach())
        return torch.cat(zs)

    sides = {"official": official, "factedit": factedit}
    runs = []
    for rep in range(args.memit_reps):
        order = ["official", "factedit"] if rep % 2 == 0 else ["factedit", "official"]
        row: dict = {"rep": rep, "first": order[0]}
        z = {}
        for side in order:
            t = time.perf_counter()
            z[side] = sides[side]()
            row[f"{side}_s"] = time.perf_counter() - t
        cos = [_cos(a, b) for a, b in zip(z["official"], z["factedit"])]
        pairs = list(zip(z["official"].double(), z["factedit"].double()))
        rel = [float((b - a).norm() / a.norm()) for a, b in pairs]
        row.update(ratio=row["official_s"] / row["factedit_s"], min_cos=min(cos), max_rel_diff=max(rel))
        row["cos_per_request"], row["rel_diff_per_request"] = cos, rel
        runs.append(row)
        print(
            f"MEMIT z rep {rep} ({row['first']} first), {len(records)} requests: official (compute_z one at a time) "
            f"{row['official_s']:.2f} s, factedit (batched) {row['factedit_s']:.2f} s, ratio {row['ratio']:.2f}x | "
            f"z: min cos {row['min_cos']:.6f}, max |z_f - z_o|/|z_o| {row['max_rel_diff']:.2e}",
            flush=True,
        )
    return {
        "records_file": str(records_file),
        "start": args.memit_start,
        "case_ids": [r["case_id"] for r in records],
        "z_layer": z_layer,
        "factedit_hparams": hp.model_dump(mode="json"),
        "official_hparams": vars(off_hp),
        "templates": templates,
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-rome", type=Path, default=OFFICIAL / "rome")
    ap.add_argument("--official-memit", type=Path, default=OFFICIAL / "memit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", type=int, nargs="+", default=[3, 5, 9], help="case ids of edits.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--part", choices=["rome", "memit", "both"], default="both")
    ap.add_argument("--memit-batch", type=int, default=32, help="CounterFact dev records for the z comparison")
    ap.add_argument("--memit-start", type=int, default=0, help="first CounterFact dev record")
    ap.add_argument("--memit-reps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    args.official_rome, args.official_memit = args.official_rome.resolve(), args.official_memit.resolve()
    out = args.out.resolve() if args.out else None

    torch.set_num_threads(args.threads)
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    result: dict = {"machine": machine(), "threads": args.threads, "omp_wait_policy": wait, "factedit": tree_state()}
    print(result["machine"], flush=True)
    print(f"threads {args.threads}; OMP_WAIT_POLICY={wait}", flush=True)
    if wait.upper() != "PASSIVE" and args.threads > 1:
        print("warning: run with OMP_WAIT_POLICY=PASSIVE (or --threads 1) for fair figures", flush=True)
    state = result["factedit"]
    print(f"factedit {state['commit']}, working tree (diff {state['diff_sha256']}): {state['diff_stat'] or 'clean'}")
    if state["untracked"]:
        print("untracked: " + " ".join(state["untracked"].split()), flush=True)
    model, tok = load_model(document_start=False)  # float32; tokenized as the official code does
    model.eval()
    if args.part in ("rome", "both"):
        result["rome"] = bench_rome(model, tok, args)
    if args.part in ("memit", "both"):
        result["memit"] = bench_memit(model, tok, args)
    if out is not None:
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
