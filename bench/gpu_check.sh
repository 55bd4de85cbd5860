#!/usr/bin/env bash
# The device check in one command (see bench/gpu_check.py): under 8 minutes on one GPU.
#   bash bench/gpu_check.sh                       # cuda, bfloat16 and float32
#   bash bench/gpu_check.sh --device cpu --smoke  # CPU smoke mode
set -euo pipefail
cd "$(dirname "$0")"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec ../.venv/bin/python gpu_check.py "$@"
