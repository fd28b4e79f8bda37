#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for the GPUs we target (sm_75 T4 / RTX 20 to sm_120 RTX 50, as setup.py's
# CUDA_ARCHS); no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
srcs=(csrc/cuda/*.cu)
[ ${#srcs[@]} -gt 0 ] || { echo "no CUDA sources in csrc/cuda"; exit 0; }
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for src in "${srcs[@]}"; do
  for arch in 75 80 86 89 90 120; do
    nvcc -O3 -std=c++17 -Xcompiler -fPIC -gencode "arch=compute_${arch},code=sm_${arch}" \
         -Xptxas -v -c "$src" -o "$out/$(basename "$src").$arch.o" 2>&1 | grep -E "error|spill|registers" || true
    [ -f "$out/$(basename "$src").$arch.o" ] || { echo "FAILED: $src for sm_$arch"; exit 1; }
    echo "ok: $src sm_$arch"
  done
done
# the host-side bindings: a syntax check against pybind11 and the CUDA headers
py=${PYTHON:-python3}
if incs=$("$py" -m pybind11 --includes 2>/dev/null); then
  # nvcc may be a wrapper script: ask it where its headers are (the dry run prints its INCLUDES)
  cuda_inc=$(nvcc --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
  cuda_inc=${cuda_inc%/}
  [ -n "$cuda_inc" ] && [ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
  for src in csrc/cuda/*.cpp; do
    g++ -std=c++17 -fsyntax-only $incs -I"$cuda_inc" "$src" || { echo "FAILED: $src"; exit 1; }
    echo "ok: $src (host syntax)"
  done
fi
