"""Benchmark: what the full-content weights fingerprint costs on the default model, next to one ROME edit.

    OMP_NUM_THREADS=1 python bench/fingerprint_cost.py [--reps 5]

Prints the machine (CPU, threads, OMP_WAIT_POLICY), then in seconds: the cold fingerprint (every
byte hashed, SHA-256), the cached one (version counters + the block-sum content check), the two
parts alone, the time of one ROME edit (official reference statistics and templates when present,
so no statistics pass is timed) and how much of that edit is spent in fingerprints and weight
hashes (cProfile), and a patch apply + revert. Finally it checks that the probes of issue 18
change the fingerprint: ``W[0, 1] += 1000`` on layer 6's down_proj in place, and the same through
``param.data`` (which does not bump the version counter).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import torch
from common import machine
from safetensors.torch import load_file

from factedit import EditRequest, ROMEHyperParams, compute_rome, load_model
from factedit.integrity import tensor_bytes_sha256
from factedit.models import arch_for
from factedit.models.fingerprint import content_check, model_fingerprint

REFERENCE = Path(os.environ.get("FACTEDIT_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def timed(fn, reps: int) -> float:
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def edit_inputs(model, tok):
    hp = ROMEHyperParams.for_model(model)
    ref = REFERENCE / "rome_official_smollm2"
    request = EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome")
    if (ref / "second_moment_layer6.safetensors").is_file() and hp.layers == [6]:
        stats = {6: load_file(str(ref / "second_moment_layer6.safetensors"))["C"]}
        templates = json.loads((ref / "context_templates.json").read_text())
        return hp, request, stats, templates
    from factedit.stats.second_moment import second_moments

    return hp, request, second_moments(model, tok, hp.layers, n_tokens=2000, progress=False), None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(machine(), f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)
    model, tok = load_model()
    state = [t for t in model.state_dict(keep_vars=True).values()]
    n_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in state}.values())
    out: dict = {"weights_MB": round(n_bytes / 1e6, 1)}
    out["cold_s"] = timed(lambda: model_fingerprint(model, full=True), args.reps)
    model_fingerprint(model)
    out["cached_s"] = timed(lambda: model_fingerprint(model), args.reps)
    unique = list({id(t): t for t in state}.values())
    out["sha256_only_s"] = timed(lambda: [tensor_bytes_sha256(t) for t in unique], args.reps)
    out["content_check_only_s"] = timed(lambda: [content_check(t) for t in unique], args.reps)
    print("fingerprint", json.dumps(out), flush=True)

    hp, request, stats, templates = edit_inputs(model, tok)
    compute_rome(model, tok, request, hp, second_moment=stats, templates=templates)  # warm-up
    edit = timed(lambda: compute_rome(model, tok, request, hp, second_moment=stats, templates=templates), 3)
    profile = cProfile.Profile()
    profile.enable()
    result = compute_rome(model, tok, request, hp, second_moment=stats, templates=templates)
    profile.disable()
    spent = {
        f"{func[2]}_s": round(entry[3], 4)
        for func, entry in pstats.Stats(profile).stats.items()  # type: ignore[attr-defined]
        if func[2] in ("model_fingerprint", "tensor_sha256") and "fingerprint.py" in func[0]
    }
    calls = {
        f"{func[2]}_calls": entry[1]
        for func, entry in pstats.Stats(profile).stats.items()  # type: ignore[attr-defined]
        if func[2] == "model_fingerprint" and "fingerprint.py" in func[0]
    }
    applied = timed(lambda: result.patch.apply(model).revert(), args.reps)
    print("edit", json.dumps({"rome_edit_s": edit, **spent, **calls, "apply_and_revert_s": applied}), flush=True)

    name = arch_for(model).rewrite_weight_at(6)
    param = model.get_parameter(name)
    before = model_fingerprint(model)
    original = param.detach().clone()
    probes = {}
    with torch.no_grad():
        param[0, 1] += 1000
    probes["inplace_changes_fingerprint"] = model_fingerprint(model) != before
    with torch.no_grad():
        param.copy_(original)
    probes["restored_matches"] = model_fingerprint(model) == before
    version = param._version
    param.data[0, 1] += 1000
    probes["data_write_bumped_version"] = param._version != version
    probes["data_write_changes_fingerprint"] = model_fingerprint(model) != before
    with torch.no_grad():
        param.copy_(original)
    probes["restored_again_matches"] = model_fingerprint(model) == before
    print("probes", json.dumps(probes), flush=True)


if __name__ == "__main__":
    main()
