#!/usr/bin/env bash
# The three views of editing side by side: teacher-forced ES/PS/NS, WILD's generative success and
# EasyEdit's token accuracy, on the first 200 CounterFact dev cases, for the unedited model, FT, FT-L,
# ROME, MEMIT (one batch of 200) and AlphaEdit (sequential batches of 20). FT and FT-L compute 16 cases'
# independent edits in one pass (--group 16: each case still edited alone; docs/evaluation.md).
#
#     bash bench/honest_table.sh            # runs what is missing, then prints the table
#     bash bench/honest_table.sh --summary  # only the table, from what is done
#
# Hours on a 2-core CPU; resumable (bench/run_plan.sh): committed runs under state/honest_200 are never
# redone. One model-heavy process at a time: the runs go in order.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/run_plan.sh
N=${N:-200}
RUNS=runs/honest_200
STATE=state/honest_200
COMMON=(--dataset counterfact --n "$N" --threads "${THREADS:-2}")
PRE=none  # the unedited run first: every other run reuses its scores
PLAN=(
  "none|--method none"
  "ft|--method ft --group 16"
  "ft-l|--method ft-l --group 16"
  "rome|--method rome"
  "memit_batch200|--method memit --batch $N"
  "alphaedit_seq20|--method alphaedit --batch 20 --sequential --drift-every 5"
)
run_plan "$@"
mapfile -t finished < <(done_runs)
[ ${#finished[@]} -gt 0 ] || { echo "no run done yet" >&2; exit 1; }
"$FACTEDIT" summarize "${finished[@]}" --csv "$RUNS/summary.csv"
