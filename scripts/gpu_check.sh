#!/usr/bin/env bash
# The GPU run (make gpu: the smoke run; make gpu-all: every other part): scripts/gpu_check.py, see its docstring.
#   bash scripts/gpu_check.sh [--part smoke|tests|ops-a|ops-b|e2e|context|all] [--budget S] [--export DIR]
#                             [--force] [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
