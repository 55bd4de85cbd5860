#!/usr/bin/env bash
# Issue 15's scaling table: 2,000 CounterFact dev edits in sequential batches of 100 (ROME: one at a time)
# for UltraEdit, MEMIT, AlphaEdit, AlphaEdit+NAS, EMMET and ROME, with drift points once 100, 1,000 and
# 2,000 edits are in the model, each measuring every edit made so far (edits and their paraphrases still
# holding, neighbours keeping the truth, fluency), and the final model scored on all 2,000 cases
# (teacher-forced ES/PS/NS; generative view off). NAS's anchor is measured first (bench/nas_anchor.py).
#
#     bash bench/scaling_table.sh            # runs what is missing, then the table and plots
#     bash bench/scaling_table.sh --summary  # only the table and plots, from what is done
#     bash bench/scaling_table.sh --keep-partial   # before a session ends: the unfinished run, for git
#
# Many hours on a 2-core CPU (z for 2,000 requests about 2 h per MEMIT-style method, ROME about 7 h);
# resumable (bench/run_plan.sh): committed runs under state/scaling_2000 are never redone.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/run_plan.sh
N=${N:-2000}
RUNS=runs/scaling_$N
STATE=state/scaling_$N
ANCHOR_FILE=$STATE/nas_anchor.json
if [ ! -f "$ANCHOR_FILE" ] && [ "${1:-}" != "--summary" ] && [ "${1:-}" != "--keep-partial" ]; then
  .venv/bin/python bench/nas_anchor.py --out "$ANCHOR_FILE"
fi
ANCHOR=$( [ -f "$ANCHOR_FILE" ] && .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['anchor'])" "$ANCHOR_FILE" || echo none)
COMMON=(--dataset counterfact --n "$N" --no-generative --threads "${THREADS:-2}")
SEQ="--sequential --drift-at 100,1000,$N --drift-cases $N"
PRE=none  # the unedited scores of the 2,000 cases, reused by every run
PLAN=(
  "none|--method none"
  "ultraedit_b100|--method ultraedit --batch 100 $SEQ"
  "memit_b100|--method memit --batch 100 $SEQ"
  "alphaedit_b100|--method alphaedit --batch 100 $SEQ"
  "alphaedit_nas_b100|--method alphaedit --batch 100 $SEQ --set value_norm_anchor=$ANCHOR"
  "emmet_b100|--method emmet --batch 100 $SEQ"
  "rome_b1|--method rome $SEQ"
)
run_plan "$@"
mapfile -t finished < <(done_runs | grep -v "/$PRE\$" || true)
[ ${#finished[@]} -gt 0 ] || { echo "no edited run done yet" >&2; exit 1; }
labels=()
for run in "${finished[@]}"; do labels+=("$(basename "$run"):$run"); done
.venv/bin/python bench/scaling.py "${labels[@]}" --out "$RUNS/scaling"
