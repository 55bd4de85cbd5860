#!/usr/bin/env bash
# General-capability drift after 0, 10, 100 and 1,000 CounterFact dev edits: WikiText-2 and held-out
# Wikipedia perplexity, accuracy on known facts unrelated to the edits, and generation entropy, for MEMIT
# (one batch of 10, 100 and 1,000), AlphaEdit (sequential batches of 10) and ROME (sequential, one at a
# time). Teacher-forced scores only (the generative view is bench/honest_table.sh's).
#
#     bash bench/drift_table.sh            # runs what is missing, then the table and a report
#     bash bench/drift_table.sh --summary  # only the table and report, from what is done
#
# Many hours on a 2-core CPU (ROME's 1,000 sequential edits alone about 3.5 h); resumable
# (bench/run_plan.sh): committed runs under state/drift_1000 are never redone.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/run_plan.sh
RUNS=runs/drift_1000
STATE=state/drift_1000
COMMON=(--dataset counterfact --no-generative --threads "${THREADS:-2}")
PRE=none_1000  # the unedited scores of the 1,000 cases, reused by every run
AT=10,100,1000
PLAN=(
  "none_1000|--method none --n 1000"
  "memit_batch10|--method memit --n 10 --batch 10 --capability"
  "memit_batch100|--method memit --n 100 --batch 100 --capability"
  "memit_batch1000|--method memit --n 1000 --batch 1000 --capability"
  "alphaedit_seq10|--method alphaedit --n 1000 --batch 10 --sequential --drift-at $AT --capability"
  "rome_seq|--method rome --n 1000 --sequential --drift-at $AT --capability"
)
run_plan "$@"
mapfile -t finished < <(done_runs | grep -v "/$PRE\$" || true)
[ ${#finished[@]} -gt 0 ] || { echo "no edited run done yet" >&2; exit 1; }
"$FACTEDIT" summarize "${finished[@]}" --all-cases --csv "$RUNS/summary.csv"
"$FACTEDIT" report "${finished[@]}" --all-cases --out "$RUNS/report"
