"""How fast this CPU multiplies float32 matrices: the ceiling for any exact v* optimisation.

An exact ROME edit is a fixed number of matrix FLOPs (docs/performance.md counts them: about 1.0 TFLOP for
CounterFact case 3 with the prefix cache, 4.0 TFLOP the way the official code runs it). So the best time an
edit can take on a machine is those FLOPs over the fastest float32 product the machine runs. This prints
that rate, at 1 and 2 threads, for a large square product (the machine's practical peak) and for the shapes
one live v* step multiplies, and the fastest edit time and official-code ratio that rate allows.

    OMP_WAIT_POLICY=PASSIVE python bench/gemm_peak.py [--threads 1 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from machine import cpu_name, usable_cores

log = logging.getLogger("gemm_peak")

# (name, rows, inner, cols): the square peak, then one live v* step's products on case 3 (126 live tokens,
# 576 hidden, 1,536 MLP width, 22 LM-head rows over a 49,152 vocabulary; SmolLM2-135M).
SHAPES = [
    ("square 2048", 2048, 2048, 2048),
    ("square 1024", 1024, 1024, 1024),
    ("MLP up/gate (126 x 576 x 1536)", 126, 576, 1536),
    ("MLP down (126 x 1536 x 576)", 126, 1536, 576),
    ("projection (126 x 576 x 576)", 126, 576, 576),
    ("LM head (22 x 576 x 49152)", 22, 576, 49152),
    ("official MLP (418 x 576 x 1536)", 418, 576, 1536),
]
LIVE_TFLOP_PER_EDIT = 1.0  # docs/performance.md, case 3, the exact computation's matrix FLOPs
OFFICIAL_SECONDS = {1: 67.7, 2: 47.9}  # docs/performance.md: the official code's median edit, side by side


def gflops(rows: int, inner: int, cols: int, repeat: int) -> float:
    """Best-of-``repeat`` rate of one float32 product, in GFLOP/s (2 FLOPs per multiply-add)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen)
    b = torch.randn(inner, cols, generator=gen)
    out = torch.empty(rows, cols)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * inner * cols / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info(
        "machine: %s, %d usable cores, torch %s, %s",
        cpu_name(),
        usable_cores(),
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates = {name: gflops(r, k, c, args.repeat) for name, r, k, c in SHAPES}
        log.info("\n%d thread(s):", threads)
        for name, rate in rates.items():
            log.info("  %-36s %7.1f GFLOP/s", name, rate)
        peak = max(rates.values())
        floor = LIVE_TFLOP_PER_EDIT * 1e3 / peak
        official = OFFICIAL_SECONDS.get(threads)
        line = f"  an exact edit's matrix work ({LIVE_TFLOP_PER_EDIT} TFLOP) at the best rate: {floor:.1f} s"
        if official:
            line += f"; against the official {official} s that is at most {official / floor:.1f}x"
        log.info(line)


if __name__ == "__main__":
    main()
