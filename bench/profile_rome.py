"""Profile of one ROME edit's v* optimisation on the default model: where the steps spend their time.

    python bench/profile_rome.py [--path live|model|plain] [--case 3] [--threads 1]

``live``: the fast path through factedit.models.live (the default for Llama-style models); ``model``: the
fast path through the model's own forward (prefix cache, skipped lower blocks, sparse LM head; what
factedit did before the live runner, and still does for other families); ``plain``: the official
computation (every prompt, every layer, logits everywhere). Original-ROME mode with the official
reference templates, as in bench_vs_official.py. Prints the torch profiler's self CPU time grouped by
role (matrix products by what they compute, attention, element-wise, autograd bookkeeping), the FLOPs
of the matrix products per step against the live work they must do, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import machine
from torch.profiler import ProfilerActivity, profile

import factedit.editing.values as values_module
from factedit import EditRequest, ROMEHyperParams, load_model
from factedit.models.architectures import arch_for
from factedit.text import pad_id

REFERENCE = Path(os.environ.get("FACTEDIT_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
ATTENTION = ("scaled_dot_product", "aten::_softmax", "aten::masked_fill")


def role(name: str, shapes: list, vocab: int, inner: int) -> str:
    """What an op computes, from its name and input shapes."""
    if name in MATMULS:
        dims = {d for s in shapes if s for d in s}
        if vocab in dims:
            return "matmul: LM head"
        if inner in dims:
            return "matmul: MLP"
        return "matmul: attention" if name == "aten::bmm" else "matmul: q/k/v/o projections"
    if any(a in name for a in ATTENTION):
        return "attention kernels / softmax / mask"
    if name.startswith("autograd::") or "Backward" in name:
        return "autograd bookkeeping"
    if name in {"aten::fill_", "aten::zero_", "aten::empty", "aten::empty_strided", "aten::copy_", "aten::cat"}:
        return "allocation / copies / cat"
    return "element-wise and other"


def matmul_flops(name: str, shapes: list) -> float:
    if name == "aten::mm" and len(shapes) >= 2 and shapes[0] and shapes[1]:
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2.0 * m * k * n
    if name == "aten::addmm" and len(shapes) >= 3 and shapes[1] and shapes[2]:
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2.0 * m * k * n
    if name == "aten::bmm" and len(shapes) >= 2 and shapes[0] and shapes[1]:
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return 2.0 * b * m * k * n
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", choices=["live", "model", "plain"], default="live")
    ap.add_argument("--case", type=int, default=3, help="CounterFact case id of a reference case in edits.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), f"threads={args.threads} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    ref = REFERENCE / "rome_official_smollm2"
    model, tok = load_model(document_start=False)  # as the official code tokenizes
    arch = arch_for(model)
    hp = ROMEHyperParams.for_model(model, consistent_key=False, key_fit="mean").replace(
        prefix_cache=args.path != "plain"
    )
    templates = json.loads((ref / "context_templates.json").read_text())
    cases = {c["case_id"]: c for c in json.loads((ref / "edits.json").read_text())["cases"]}
    request = EditRequest.from_dict(cases[args.case]["request"])
    problem = values_module.build_value_problem(tok, request, templates)
    if args.path == "model":
        values_module._live_blocks = lambda *a: None  # the model's own forward for the fast path
    layer = hp.layers[0]

    def run():
        return values_module.optimize_values(
            model, arch, [problem], site=arch.rewrite_at(layer), layer=layer, hparams=hp, pad=pad_id(tok)
        )

    run()  # warm-up
    t = time.perf_counter()
    result = run()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    vocab, inner = model.config.vocab_size, model.config.intermediate_size
    seconds: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        r = role(event.key, event.input_shapes, vocab, inner)
        seconds[r] += event.self_cpu_time_total / 1e6
        flops[r] += matmul_flops(event.key, event.input_shapes) * event.count
    total = sum(seconds.values())
    steps = result.steps
    live = [len(ids) - look for ids, look in zip(problem.rewrite_prompts, problem.rewrite_lookup, strict=True)]
    print(f"path={args.path} case={args.case} steps={steps} wall={wall:.2f} s (profiled self CPU {total:.2f} s)")
    print(f"live tokens per step: {sum(live)} rewrite + {len(problem.kl_prompts)} KL lookups")
    print(f"{'role':38s} {'s':>7s} {'share':>6s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
    table = []
    for r, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        gf = flops[r] / 1e9
        rate = gf / s if gf and s else 0.0
        table.append({"role": r, "s": s, "share": s / total, "gflop": gf, "gflop_per_s": rate})
        print(f"{r:38s} {s:7.2f} {s / total:6.1%} {gf:8.1f} {rate:8.1f}")
    print(f"{'matmul total':38s} {sum(v for k, v in seconds.items() if k.startswith('matmul')):7.2f}")
    print(f"matmul GFLOP per step: {sum(flops.values()) / 1e9 / steps:.1f}")
    if args.out:
        record = {"path": args.path, "case": args.case, "wall_s": wall, "steps": steps, "threads": args.threads}
        args.out.write_text(json.dumps({**record, "machine": machine(), "table": table}, indent=1))


if __name__ == "__main__":
    main()
