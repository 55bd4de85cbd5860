"""Run factedit's probe suite (bad inputs, faults, hostile requests) and count what is handled cleanly.

    .venv/bin/python scripts/probe_suite.py            # the fast probes (tests/test_probes_*.py)
    .venv/bin/python scripts/probe_suite.py --slow     # also the web load figures (bench/web_load.py)

Every probe is one parametrized test case whose id names its kind ("patch-bitflip-factor-u",
"predict-k-negative", ...); a probe passes when the bad input was refused with a clear one-line error
and the model and the files on disk were left unchanged. This prints, per area, probes tried and
handled cleanly, then the totals and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from machine import cpu_name  # noqa: E402


def machine() -> str:
    return f"{cpu_name()}; {os.cpu_count()} cores; python {platform.python_version()}"


def run_probes(files: list[Path]) -> tuple[Counter, Counter, list[str]]:
    """Run the probe files under pytest; return tried and handled counts per file and the failures."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "probes.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *map(str, files)]
        subprocess.run(cmd, cwd=REPO, check=False)
        root = ET.parse(report).getroot()
    tried: Counter = Counter()
    handled: Counter = Counter()
    failures: list[str] = []
    for case in root.iter("testcase"):
        if case.find("skipped") is not None:
            continue
        area = case.get("classname", "").rsplit(".", 1)[-1]
        tried[area] += 1
        if case.find("failure") is None and case.find("error") is None:
            handled[area] += 1
        else:
            failures.append(f"{area}::{case.get('name')}")
    return tried, handled, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow", action="store_true", help="also run bench/web_load.py (minutes, model-heavy)")
    args = ap.parse_args()
    files = sorted((REPO / "tests").glob("test_probes_*.py"))
    tried, handled, failures = run_probes(files)
    print(f"\nprobe suite on {machine()}")
    print(f"{'area':<28} {'tried':>6} {'handled':>8}")
    for area in sorted(tried):
        print(f"{area:<28} {tried[area]:>6} {handled[area]:>8}")
    print(f"{'all':<28} {sum(tried.values()):>6} {sum(handled.values()):>8}")
    for name in failures:
        print(f"not handled: {name}")
    status = 0 if not failures else 1
    if args.slow:
        status |= subprocess.run(
            [sys.executable, str(REPO / "bench" / "web_load.py")], cwd=REPO, check=False
        ).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
