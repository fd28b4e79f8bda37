#!/usr/bin/env bash
# Downloads, on a machine with a package index, the wheels the GPU image lacks (CPython 3.12, Linux x86-64;
# see the device tool's KINDS.md for what it holds) into .whl/ (git-ignored). Carry `.whl` with the device
# call; scripts/gpu_check.py installs them there with --no-index. About 46 MB (bitsandbytes is 43 of it).
#   bitsandbytes       QLoRA on CUDA and the bnb + PEFT peer rows
#   liger-kernel, cut-cross-entropy   peers of the fused loss / the whole model
#   rouge-score (+ nltk)              the ROUGE metric of fastnlg eval (rouge-score has no wheel: built here)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .whl
rm -f .whl/*.whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    bitsandbytes==0.50.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 nltk==3.10.4
$PY -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2
ls -la .whl
$PY scripts/gpu_check.py --dry-run
