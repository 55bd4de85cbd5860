#!/usr/bin/env bash
# 200 sequential ROME edits with the guard (--guard, default thresholds) against the same 200 without it
# (state/rome_seq_200_keyfit, committed): how many edits the guard refuses, and the drift points (earlier
# edits holding, neighbours keeping the truth, fluency) of both runs, every 40 edits. Same settings as the
# unguarded run (first 200 CounterFact dev cases, teacher-forced scores, unedited scores reused).
#
#     bash bench/guard_table.sh            # runs what is missing, then the table
#     bash bench/guard_table.sh --summary  # only the table
#
# About an hour on a 2-core CPU; resumable (bench/run_plan.sh): committed runs under state/guard_200 are
# never redone.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/run_plan.sh
RUNS=runs/guard_200
STATE=state/guard_200
UNGUARDED=state/rome_seq_200_keyfit
COMMON=(--dataset counterfact --n 200 --sequential --drift-every 40 --no-generative --threads "${THREADS:-2}"
  --pre-from state/counterfact_rome_keyfit)
PRE=
PLAN=("rome_seq200_guard|--method rome --guard")
run_plan "$@"
mapfile -t finished < <(done_runs)
"$FACTEDIT" summarize "$UNGUARDED" "${finished[@]}" --csv "$RUNS/summary.csv"
for run in "$UNGUARDED" "${finished[@]}"; do
  echo "drift points of $run (edits, earlier edits holding, neighbours keeping the truth, GE, refused):"
  .venv/bin/python - "$run" <<'PY'
import sys
from factedit.evaluation.batched import read_drift
for d in read_drift(sys.argv[1]):
    nan = float("nan")
    print(f"  {d['edits']:4d}  {d.get('edits_holding', nan):.3f}  {d.get('neighbourhood_kept', nan):.3f}"
          f"  {100 * d.get('ngram_entropy', nan):.1f}  {d.get('refused', '-')}")
PY
done
