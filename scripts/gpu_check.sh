#!/usr/bin/env bash
# GPU tier + benchmarks in one go, for a machine with CUDA (e.g. through the device tool).
# Uses the machine's own packages (installs nothing that is there; what is missing comes from carried wheels
# in .whl/ or is named, and the run stops), builds the C++ extension in place,
# runs `pytest -m gpu`, then the benchmark suite, and writes everything to
# benchmarks/results/<gpu>-<date>/ (test log, benchmark CSV/JSON/markdown/plots, env.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
# The GPU image has its own stack and no package index: install nothing that is there. Missing modules come
# from wheels carried in .whl/ (see the device tool's notes), installed without an index; else stop and say so.
missing=$($PY - <<'PYEOF'
import importlib.util
need = ["pybind11", "pytest", "pytest_benchmark", "matplotlib", "transformers", "peft", "safetensors"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check: installing carried wheels for: $missing"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fastnlg-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/fastnlg-site${PYTHONPATH:+:$PYTHONPATH}
  missing=$($PY -c "import importlib.util as u; print(' '.join(m for m in '$missing'.split() if u.find_spec(m) is None))")
fi
if [ -n "$missing" ]; then
  echo "gpu_check: missing on this machine: $missing. Carry their wheels in .whl/ (pip download --only-binary=:all:" \
       "--python-version $($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') --no-deps ...)" >&2
  exit 1
fi
if command -v nvcc >/dev/null; then  # the CUDA kernels too (csrc/cuda), so the gpu tier tests them
  FASTNLG_BUILD_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -1
else
  $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -1
fi
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=benchmarks/results/${gpu}-$(date -u +%Y%m%d)
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD; } > "$out/env.txt" 2>&1
$PY -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
$PY -m benchmarks.run --device cuda --out "$out" 2>&1 | tee "$out/benchmarks.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc -> $out"
exit $(( tests_rc != 0 || bench_rc != 0 ))
