#!/usr/bin/env bash
# Shared by the resumable run tables (bench/honest_table.sh, bench/drift_table.sh): runs a PLAN of
# `factedit eval` runs in order, one model-heavy process at a time, at two levels of resumability. A run
# interrupted mid-way resumes from its folder under $RUNS (same machine); each finished run's small state
# files (manifest and JSON lines, no patches) are copied to $STATE/<run>, which a fresh checkout restores
# before running, so a committed run is never redone.
#
# The caller sets RUNS, STATE, PLAN ("name|eval options" entries), COMMON (options every run gets) and
# PRE (the name of the run whose unedited scores the others reuse with --pre-from; empty for none), then
# calls run_plan "$@" and, for the table, done_runs. Before a session ends, `bash <table>.sh --keep-partial`
# copies the unfinished run's state to $STATE/partial/<run> for git; the next run of the table resumes it.
set -euo pipefail
FACTEDIT=${FACTEDIT:-.venv/bin/factedit}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

restore() {  # a committed finished run comes back as a run folder, for the summary
  local name=$1
  if [ -d "$STATE/$name" ] && [ ! -f "$RUNS/$name/manifest.json" ]; then
    mkdir -p "$RUNS/$name" && cp "$STATE/$name"/* "$RUNS/$name"/
  fi
}

restore_partial() {  # a committed unfinished run comes back as its folder, so the run resumes from it
  local name=$1 from=$STATE/partial/$1
  if [ -d "$from" ] && [ ! -f "$RUNS/$name/manifest.json" ]; then
    mkdir -p "$RUNS/$name" && cp -r "$from"/. "$RUNS/$name"/
  fi
}

keep_partial() {  # an unfinished run's state for git: manifest, JSON lines, and its saved patches if small
  local name=$1 to=$STATE/partial/$1
  [ -f "$RUNS/$name/manifest.json" ] || return 0
  rm -rf "$to" && mkdir -p "$to"
  cp "$RUNS/$name/manifest.json" "$to"/
  for f in "$RUNS/$name"/*.jsonl; do [ -f "$f" ] && cp "$f" "$to"/; done
  if [ -d "$RUNS/$name/patches" ] && [ "$(du -sm "$RUNS/$name/patches" | cut -f1)" -lt 32 ]; then
    cp -r "$RUNS/$name/patches" "$to"/
  fi
  echo "kept $RUNS/$name in $to (commit it; the next run of this plan resumes from it)"
}

keep() {  # the small state files of a finished run, for git
  local name=$1
  mkdir -p "$STATE/$name"
  cp "$RUNS/$name/manifest.json" "$STATE/$name"/
  for f in "$RUNS/$name"/*.jsonl; do [ -f "$f" ] && cp "$f" "$STATE/$name"/; done
}

run_plan() {  # every run of PLAN not committed yet; --summary: none; --keep-partial: keep unfinished ones
  local entry name opts pre
  if [ "${1:-}" = "--keep-partial" ]; then
    for entry in "${PLAN[@]}"; do
      name=${entry%%|*}
      [ -d "$STATE/$name" ] || keep_partial "$name"
    done
    exit 0
  fi
  [ "${1:-}" != "--summary" ] || return 0
  for entry in "${PLAN[@]}"; do
    name=${entry%%|*}
    read -r -a opts <<<"${entry#*|}"
    if [ -d "$STATE/$name" ]; then restore "$name"; continue; fi  # finished and committed: never redone
    restore_partial "$name"
    pre=()
    if [ -n "${PRE:-}" ] && [ "$name" != "$PRE" ]; then pre=(--pre-from "$RUNS/$PRE"); fi
    "$FACTEDIT" eval "${opts[@]}" "${COMMON[@]}" "${pre[@]}" --out "$RUNS/$name"
    keep "$name"
    rm -rf "$STATE/partial/$name"
  done
}

done_runs() {  # the run folders of PLAN that are finished (restored from git where needed), one per line
  local entry name
  for entry in "${PLAN[@]}"; do
    name=${entry%%|*}
    restore "$name"
    [ -f "$RUNS/$name/cases.jsonl" ] && echo "$RUNS/$name"
  done
  return 0
}
