"""A few columns of a ``factedit summarize --csv`` file as a markdown table, for the docs (the summary's own
table has every column and is too wide to read there). Intervals as ``factedit summarize`` writes them:
``mean ± half`` where symmetric, ``mean [low, high]`` where not.

    python bench/summary_columns.py runs/honest_200/summary.csv [--columns ES PS NS "Gen ES" ...]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

DEFAULT = ["ES", "PS", "NS", "Gen ES", "Gen PS", "Gen NS", "Gen loc", "EE rel", "EE gen", "EE loc", "edit s"]


def cell(mean: float, low: float, high: float, digits: int = 1) -> str:
    if low != low or high != high:  # NaN: no interval
        return f"{mean:.{digits}f}"
    if abs((mean - low) - (high - mean)) < 0.05:
        return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--columns", nargs="+", default=DEFAULT)
    args = ap.parse_args()
    values: dict[str, dict[str, tuple[float, float, float]]] = defaultdict(dict)
    runs: list[str] = []
    for row in csv.DictReader(open(args.csv)):
        if row["run"] not in runs:
            runs.append(row["run"])
        values[row["run"]][row["metric"]] = (float(row["mean"]), float(row["ci_low"]), float(row["ci_high"]))
    print("| run | " + " | ".join(args.columns) + " |")
    print("|---|" + "---:|" * len(args.columns))
    for run in runs:
        cells = [
            cell(*values[run][c], digits=2 if c == "edit s" else 1) if c in values[run] else "–" for c in args.columns
        ]
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
