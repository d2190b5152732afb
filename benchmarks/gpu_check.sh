#!/usr/bin/env bash
# One-call GPU check (see benchmarks/gpu_check.py): run from a checkout with
# the prebuilt optax8/_lib; results go to $OUT (default ./gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
