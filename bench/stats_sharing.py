"""Benchmark: statistics shared between dtypes of the same weights (issue 13), on the default model.

    OMP_NUM_THREADS=1 flock /tmp/factedit-model.lock python bench/stats_sharing.py [--tokens 2000] [--reps 3]

Prints the machine, then JSON lines:

- ``fingerprints``: whether the bfloat16 / float16 models that ``load_model(dtype=...)`` gives have
  exactly the fingerprint ``cast_fingerprint`` computes from the float32 model (the real loading
  path: converted float32 folder, tied embeddings), and what ``cast_fingerprint`` costs per dtype
  next to a cold float32 fingerprint;
- ``aliases``: the extra time ``second_moments`` spends on a float32 model to file its result for
  both casts (``write_aliases``: cast + hash per dtype, then one small file per layer and dtype; the
  casts are remembered per content fingerprint, so later saves only write files);
- ``throughput``: tokens per second of a statistics pass at each weight dtype (``collect_second_moments``,
  ``--tokens`` tokens of the default corpus, the default ROME layer);
- ``lookup``: seconds for a bfloat16 model to get the statistics through the alias (first call: its
  own fingerprint hashed cold; later calls: the remembered digests), and the seconds of a bfloat16
  pass of the default ``mom2_n_tokens`` it replaces, extrapolated from the measured rate;
- ``difference`` (relative Frobenius norms): the statistics of each half-precision model's own weights,
  computed in float32 on their exact upcast values, against (a) the reused float32 statistics and (b)
  the statistics that model computes in half precision; next to the relative rounding the cast puts
  into the rewrite weight itself, and the sampling noise: float32 statistics of another sample of as
  many tokens (``shuffle_seed=1``) against the first.

Statistics go to a temporary folder; the converted model comes from ``$FACTEDIT_HOME`` as usual.
``--random-weights FOLDER`` (e.g. ``$FACTEDIT_HOME/models/smollm2-135m``) measures the same shapes without
reading real weights: FOLDER's config and tokenizer, randomly initialised weights (seed 0) saved as a
float32 folder and loaded from it through ``load_model`` at each dtype, the path a converted model takes.
Speeds do not depend on the weights' values; the ``difference`` figures do.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine

from factedit import ROMEHyperParams, load_model
from factedit.models import arch_for
from factedit.models.fingerprint import cast_fingerprint, forget_digests, model_fingerprint
from factedit.models.tokens import document_start_of
from factedit.stats.corpus import open_corpus
from factedit.stats.second_moment import StatsKey, collect_second_moments, second_moments, write_aliases

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn, reps: int = 1) -> tuple[float, object]:
    runs, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_folder(like: Path, folder: Path) -> str:
    """A float32 model folder with ``like``'s config and tokenizer and random weights (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like), dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(like).save_pretrained(folder)
    return str(folder)


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="stats-sharing-"))
    try:
        run(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(scratch: Path) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per timed statistics pass")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer", type=int, help="the layer (default: the model's ROME layer)")
    ap.add_argument("--random-weights", type=Path, metavar="FOLDER", help="FOLDER's shapes, random weights")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine(), flush=True)

    source = random_folder(args.random_weights, scratch / "model") if args.random_weights else None
    print("model", json.dumps({"random_weights_like": str(args.random_weights) if source else None}), flush=True)
    model, tok = load_model(source)
    half_models = {name: load_model(source, dtype=name)[0] for name in HALF}
    hp = ROMEHyperParams.for_model(model)
    layer = args.layer if args.layer is not None else hp.layers[0]

    prints: dict = {}
    seconds, _ = timed(lambda: model_fingerprint(model, full=True), args.reps)
    prints["float32_cold_s"] = round(seconds, 3)
    for name, dtype in HALF.items():
        seconds, cast = timed(lambda dtype=dtype: cast_fingerprint(model, dtype), args.reps)
        prints[f"cast_{name}_s"] = round(seconds, 3)
        prints[f"loaded_{name}_matches_cast"] = model_fingerprint(half_models[name]) == cast
    print("fingerprints", json.dumps(prints), flush=True)

    folder = scratch / "stats"
    corpus = open_corpus()
    key = StatsKey(
        model_fingerprint(model),
        arch_for(model).rewrite_at(layer),
        corpus.corpus_id,
        args.tokens,
        1024,
        "float32",
        None,
        document_start_of(tok),
    )  # fmt: skip  -- the key second_moments files this layer under
    cold_s, written = timed(lambda: write_aliases(model, [key], folder))  # both casts hashed (fresh process)
    warm_s, _ = timed(lambda: write_aliases(model, [key], folder), args.reps)  # casts remembered: files only
    print(
        "aliases",
        json.dumps(
            {
                "write_aliases_first_s": round(cold_s, 3),
                "write_aliases_again_s": round(warm_s, 4),
                "files": len(written),
                "bytes_each": max(p.stat().st_size for p in written),
            }
        ),
        flush=True,
    )

    kwargs = dict(n_tokens=args.tokens, progress=False, cache_folder=folder)
    on_float32 = second_moments(model, tok, [layer], **kwargs)  # computed, saved, aliases written
    rates = {}
    computed = {}
    for name, weights in {"float32": model, **half_models}.items():
        seconds, (moments, seen) = timed(
            lambda weights=weights: collect_second_moments(weights, tok, [layer], corpus, n_tokens=args.tokens)
        )
        rates[f"{name}_tok_per_s"] = round(seen / seconds, 1)
        computed[name] = moments[layer]
    print("throughput", json.dumps({"tokens": args.tokens, "layer": layer, **rates}), flush=True)

    bf16 = half_models["bfloat16"]
    forget_digests(*bf16.state_dict(keep_vars=True).values())
    first_s, reused = timed(lambda: second_moments(bf16, tok, [layer], **kwargs))
    warm_s, _ = timed(lambda: second_moments(bf16, tok, [layer], **kwargs), args.reps)
    assert torch.equal(reused[layer], on_float32[layer]), "the bfloat16 model did not get the float32 statistics"
    assert len(list(folder.glob("*.safetensors"))) == 1, "the bfloat16 model computed statistics of its own"
    default_tokens = hp.mom2_n_tokens
    print(
        "lookup",
        json.dumps(
            {
                "bfloat16_first_s": round(first_s, 3),
                "bfloat16_warm_s": round(warm_s, 3),
                "replaces_bfloat16_pass_s": round(default_tokens / rates["bfloat16_tok_per_s"], 1),
                "replaces_float16_pass_s": round(default_tokens / rates["float16_tok_per_s"], 1),
                "at_mom2_n_tokens": default_tokens,
            }
        ),
        flush=True,
    )

    # Which is closer to the statistics of the half-precision weights themselves (computed in float32 on
    # their exact upcast values): the reused float32 ones, or those computed in half precision?
    differences = {}
    weight = model.get_parameter(arch_for(model).rewrite_weight_at(layer)).detach()
    for name, half in half_models.items():
        upcast = copy.deepcopy(half).to(torch.float32)
        exact = collect_second_moments(upcast, tok, [layer], corpus, n_tokens=args.tokens)[0][layer]
        del upcast
        differences[f"{name}_reused_float32_vs_exact"] = round(relative(computed["float32"], exact), 5)
        differences[f"{name}_computed_in_{name}_vs_exact"] = round(relative(computed[name], exact), 5)
        differences[f"{name}_weight_rounding"] = round(relative(weight.to(HALF[name]), weight), 5)
    other_sample = collect_second_moments(model, tok, [layer], corpus, n_tokens=args.tokens, shuffle_seed=1)[0]
    differences["float32_other_sample_of_as_many_tokens"] = round(relative(other_sample[layer], computed["float32"]), 5)
    print("difference", json.dumps(differences), flush=True)


if __name__ == "__main__":
    main()
