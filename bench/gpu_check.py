"""The device check: one table of what factedit does on a device, for a GPU machine when one is lent.

    bash bench/gpu_check.sh                      # cuda, bfloat16 and float32, every installed registry model
    bash bench/gpu_check.sh --device cpu --smoke # the same steps, small, on the default model (minutes on a CPU)

Rows: fast-vs-plain value optimisation (relative difference of v*), one ROME edit per model (seconds,
landed), one causal trace (seconds), a MEMIT batch (100 edits; smoke: 8) with its efficacy, and
statistics throughput (tokens/s), and a device map: the default model's lower half of blocks on the
device, the upper half on the CPU (CPU smoke mode: on disk), with a ROME edit compared to the whole
model's, its patch reverted bit-exact, and a trace.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import counterfact, machine

from factedit import EditRequest, ROMEHyperParams, compute_rome, load_model
from factedit.editing.methods import get_method
from factedit.editing.resources import EditResources
from factedit.models.registry import DEFAULT_MODEL, REGISTRY, gguf_parts
from factedit.predict import top_next_tokens
from factedit.stats.second_moment import second_moments
from factedit.tracing.core import causal_trace

EIFFEL = EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome")


def installed_models() -> list[str]:
    names = []
    for name, source in REGISTRY.items():
        try:
            gguf_parts(source)
        except Exception:  # noqa: BLE001 - not installed: skipped, and the table says so
            continue
        names.append(name)
    return names


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def check_device_map(device: str, dtype: str, smoke: bool, rows: list[tuple[str, str, str]]) -> None:
    """Blocks split over two devices (``device`` and the CPU, or the disk when ``device`` is the CPU)."""
    from factedit.models.architectures import arch_for, get_parameter, num_layers

    whole, tok = load_model(DEFAULT_MODEL, device=device, dtype=dtype)
    n_layers, other = num_layers(whole), ("disk" if device == "cpu" else "cpu")
    arch = arch_for(whole)
    # every module beside the blocks stays on the device (names from the architecture table and the model)
    parent = arch.blocks.rpartition(".")[0]
    placement = {f"{parent}.{name}": device for name, _ in whole.get_submodule(parent).named_children()}
    placement |= {name: device for name, _ in whole.named_children() if name != parent.split(".")[0]}
    del placement[arch.blocks]
    placement |= {arch.block(i): device if i < n_layers // 2 else other for i in range(n_layers)}
    label = f"{DEFAULT_MODEL} {dtype}, blocks {n_layers // 2}.. on {other}"
    n_tokens = 5_000 if smoke else 100_000
    hp = ROMEHyperParams.for_model(whole, mom2_n_tokens=n_tokens)
    v_whole = compute_rome(whole, tok, EIFFEL, hp).details[0].v.float().cpu()
    del whole
    placed, tok = load_model(DEFAULT_MODEL, device="cpu", dtype=dtype, device_map=placement)
    edit, seconds = timed(device, lambda: compute_rome(placed, tok, EIFFEL, hp))
    rel = float((edit.details[0].v.float().cpu() - v_whole).norm() / v_whole.norm())
    name = arch_for(placed).rewrite_weight_at(hp.layers[0])
    before = get_parameter(placed, name).detach().clone()
    handle = edit.patch.apply(placed)
    top = top_next_tokens(placed, tok, [EIFFEL.text], k=1)[0][0][0]
    handle.revert()
    exact = torch.equal(get_parameter(placed, name), before)
    result = f"{seconds:.1f} s; v* vs whole model {rel:.1e}; top {top!r}"
    rows.append((label, f"ROME edit, layer {hp.layers[0]}", result))
    rows.append((label, "patch revert", "bit-exact" if exact else "NOT bit-exact"))
    _, seconds = timed(device, lambda: causal_trace(placed, tok, EIFFEL.text, EIFFEL.subject, samples=10))
    rows.append((label, "causal trace (10 samples, 3 kinds)", f"{seconds:.1f} s"))


def check_model(name: str, device: str, dtype: str, smoke: bool, rows: list[tuple[str, str, str]]) -> None:
    model, tok = load_model(name, device=device, dtype=dtype)
    label = f"{name} {dtype}"
    n_tokens = 5_000 if smoke else 100_000
    hp = ROMEHyperParams.for_model(model, mom2_n_tokens=n_tokens)
    layer = hp.layers[0]
    _, seconds = timed(device, lambda: second_moments(model, tok, [layer], n_tokens=n_tokens, cache=False))
    rows.append((label, f"statistics, layer {layer}", f"{n_tokens / seconds:,.0f} tok/s"))
    resources = EditResources(model, tok)
    resources.for_hparams(hp)
    fast = compute_rome(model, tok, EIFFEL, hp, resources=resources)
    plain = compute_rome(model, tok, EIFFEL, hp.replace(prefix_cache=False), resources=resources)
    v_fast, v_plain = fast.details[0].v, plain.details[0].v
    rel = float((v_fast.float() - v_plain.float()).norm() / v_plain.float().norm())
    rows.append((label, "fast vs plain v*", f"relative difference {rel:.1e}"))
    edit, seconds = timed(device, lambda: compute_rome(model, tok, EIFFEL, hp, resources=resources))
    handle = edit.patch.apply(model)
    top = top_next_tokens(model, tok, [EIFFEL.text], k=1)[0][0][0]
    handle.revert()
    rows.append((label, f"ROME edit, layer {layer}", f"{seconds:.1f} s; top after: {top!r}"))
    trace, seconds = timed(device, lambda: causal_trace(model, tok, EIFFEL.text, EIFFEL.subject, samples=10))
    rows.append((label, "causal trace (10 samples, 3 kinds)", f"{seconds:.1f} s"))
    if name == DEFAULT_MODEL:
        n = 8 if smoke else 100
        memit = get_method("memit")
        mhp = memit.hparams(model, overrides={"mom2_n_tokens": n_tokens})
        cases = counterfact(n)
        result, seconds = timed(
            device, lambda: memit.compute(model, tok, [c.request for c in cases], mhp, resources=resources)
        )
        handle = result.patch.apply(model)
        tops = top_next_tokens(model, tok, [c.request.text for c in cases], k=1)
        landed = sum(t[0][0].strip() == c.request.target_new.strip() for t, c in zip(tops, cases, strict=True))
        handle.revert()
        rows.append((label, f"MEMIT, {n} edits in one batch", f"{seconds:.1f} s; top-1 new target {landed}/{n}"))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--smoke", action="store_true", help="small sizes, default model only")
    ap.add_argument("--models", nargs="*", default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    models = args.models or ([DEFAULT_MODEL] if args.smoke else installed_models())
    rows: list[tuple[str, str, str]] = []
    for dtype in args.dtype:
        for name in models:
            try:
                check_model(name, args.device, dtype, args.smoke, rows)
            except Exception as exc:  # noqa: BLE001 - a failing step is a row of the table, not the end of the check
                rows.append((f"{name} {dtype}", "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
        try:
            check_device_map(args.device, dtype, args.smoke, rows)
        except Exception as exc:  # noqa: BLE001 - as above
            rows.append((f"device map {dtype}", "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'model':<{width[0]}}  {'check':<{width[1]}}  result")
    for model_name, check, result in rows:
        print(f"{model_name:<{width[0]}}  {check:<{width[1]}}  {result}")


if __name__ == "__main__":
    main()
