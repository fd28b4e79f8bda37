"""`dot(a, b)`: tl.dot with fp32 operands multiplied in fp32 ("ieee"), not Triton's default tf32.

Triton's tl.dot rounds fp32 operands to tf32 (10-bit mantissa) on the GPU's matrix units: an fp32 attention
then errs about 100 times more than PyTorch's fp32 (whose matmuls keep fp32 unless the user allows tf32), which
the first GPU run found (benchmarks/results/NVIDIA_H200-20261204/smoke). fp16 / bf16 operands are unaffected
(their products are exact in the fp32 accumulator either way), so they keep the matrix units.
"""
import triton
import triton.language as tl


@triton.jit
def dot(a, b):
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
