#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for the GPUs we target (sm_80, sm_86, sm_89, sm_90); no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
srcs=(csrc/cuda/*.cu)
[ ${#srcs[@]} -gt 0 ] || { echo "no CUDA sources in csrc/cuda"; exit 0; }
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for src in "${srcs[@]}"; do
  for arch in 80 86 89 90; do
    nvcc -O3 -std=c++17 -Xcompiler -fPIC -gencode "arch=compute_${arch},code=sm_${arch}" \
         -Xptxas -v -c "$src" -o "$out/$(basename "$src").$arch.o" 2>&1 | grep -E "error|spill|registers" || true
    [ -f "$out/$(basename "$src").$arch.o" ] || { echo "FAILED: $src for sm_$arch"; exit 1; }
    echo "ok: $src sm_$arch"
  done
done
