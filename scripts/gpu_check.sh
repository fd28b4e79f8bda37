#!/usr/bin/env bash
# The GPU run (make gpu): scripts/gpu_check.py in parts or all at once; see its docstring.
#   bash scripts/gpu_check.sh [--part tests|ops-a|ops-b|e2e|context|all] [--export DIR] [--force] [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
