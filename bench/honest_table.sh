#!/usr/bin/env bash
# The three views of editing side by side: teacher-forced ES/PS/NS, WILD's generative success and
# EasyEdit's token accuracy, on the first 200 CounterFact dev cases, for the unedited model, FT, FT-L,
# ROME, MEMIT (one batch of 200) and AlphaEdit (sequential batches of 20).
#
#     bash bench/honest_table.sh            # runs what is missing, then prints the table
#     bash bench/honest_table.sh --summary  # only the table, from what is done
#
# Hours on a 2-core CPU, so it is resumable at two levels: a run interrupted mid-way resumes from its
# folder under runs/honest_200 (same machine), and each finished run's small state files (manifest and
# JSON lines, no patches) are copied to state/honest_200/<run>, which a fresh checkout restores before
# running, so committed runs are never redone. One model-heavy process at a time: the runs go in order.
set -euo pipefail
cd "$(dirname "$0")/.."
FACTEDIT=${FACTEDIT:-.venv/bin/factedit}
N=${N:-200}
RUNS=runs/honest_200
STATE=state/honest_200
COMMON=(--dataset counterfact --n "$N" --threads "${THREADS:-2}")
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# name | eval options (the unedited run first: every other run reuses its scores with --pre-from)
PLAN=(
  "none|--method none"
  "ft|--method ft"
  "ft-l|--method ft-l"
  "rome|--method rome"
  "memit_batch200|--method memit --batch $N"
  "alphaedit_seq20|--method alphaedit --batch 20 --sequential --drift-every 5"
)

restore() {  # a committed finished run comes back as a run folder, for the summary
  local name=$1
  if [ -d "$STATE/$name" ] && [ ! -f "$RUNS/$name/manifest.json" ]; then
    mkdir -p "$RUNS/$name" && cp "$STATE/$name"/* "$RUNS/$name"/
  fi
}

keep() {  # the small state files of a finished run, for git
  local name=$1
  mkdir -p "$STATE/$name"
  cp "$RUNS/$name/manifest.json" "$STATE/$name"/
  for f in "$RUNS/$name"/*.jsonl; do [ -f "$f" ] && cp "$f" "$STATE/$name"/; done
}

if [ "${1:-}" != "--summary" ]; then
  for entry in "${PLAN[@]}"; do
    name=${entry%%|*}
    read -r -a opts <<<"${entry#*|}"
    if [ -d "$STATE/$name" ]; then restore "$name"; continue; fi  # finished and committed: never redone
    pre=()
    [ "$name" = none ] || pre=(--pre-from "$RUNS/none")
    "$FACTEDIT" eval "${opts[@]}" "${COMMON[@]}" "${pre[@]}" --out "$RUNS/$name"
    keep "$name"
  done
fi

done_runs=()
for entry in "${PLAN[@]}"; do
  name=${entry%%|*}
  restore "$name"
  [ -f "$RUNS/$name/cases.jsonl" ] && done_runs+=("$RUNS/$name")
done
[ ${#done_runs[@]} -gt 0 ] || { echo "no run done yet" >&2; exit 1; }
"$FACTEDIT" summarize "${done_runs[@]}" --csv "$RUNS/summary.csv"
