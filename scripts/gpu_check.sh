#!/usr/bin/env bash
# GPU tier + benchmarks in one go, for a machine with CUDA (e.g. through the device tool).
# Uses the machine's own torch/triton (never reinstalls torch), builds the C++ extension in place,
# runs `pytest -m gpu`, then the benchmark suite, and writes everything to
# benchmarks/results/<gpu>-<date>/ (test log, benchmark CSV/JSON/markdown/plots, env.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
$PY -m pip install -q pybind11 pytest pytest-benchmark matplotlib "numpy<2.4" 2>&1 | tail -1
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
