"""GELU with a fused bias (GPT-2's MLP activation after c_fc), elementwise: z = x + b[col];  y = gelu(z).

gelu and gelu' (tanh form and erf) are GeGLU's, shared with kernels/glu.py (`_act_and_grad`, written out
there), so KIND is GEGLU_TANH or GEGLU_ERF.
Backward: dz = dy * gelu'(z) (z recomputed from x and b, nothing extra saved); db = column sums of dz (the
launcher sums the dz it wrote, in fp32).
Tiling: flat index over the n = rows x C values, BLOCK per program, fp32 math; the bias column is idx % C.
"""
import torch
import triton
import triton.language as tl

from ._launch import AOT_DTYPES, declared_signature
from .glu import _act_and_grad
from .glu_kinds import GEGLU_ERF, GEGLU_TANH

BLOCK, NUM_WARPS = 1024, 4


@triton.jit
def _z(X, B, offs, mask, C, HAS_BIAS: tl.constexpr):
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + offs % C, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def gelu_fwd_kernel(X, B, Y, n: tl.int64, C: tl.int32, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    act, _ = _act_and_grad(_z(X, B, offs, mask, C, HAS_BIAS), KIND)
    tl.store(Y + offs, act.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gelu_bwd_kernel(DY, X, B, DZ, n: tl.int64, C: tl.int32, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    _, dact = _act_and_grad(_z(X, B, offs, mask, C, HAS_BIAS), KIND)
    tl.store(DZ + offs, (dy * dact).to(DZ.dtype.element_ty), mask=mask)


def forward(x: torch.Tensor, bias, tanh: bool) -> torch.Tensor:
    """x (N, C) contiguous, bias (C,) contiguous of x's dtype or None."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        gelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, bias if bias is not None else x, y, n, x.shape[-1],
                                                  KIND=GEGLU_TANH if tanh else GEGLU_ERF, HAS_BIAS=bias is not None,
                                                  BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, bias, tanh: bool, compute_db: bool):
    """-> (dz like x, db (C,) fp32 or None)."""
    dz = torch.empty_like(x)
    n = x.numel()
    if n:
        gelu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, x, bias if bias is not None else x, dz, n, x.shape[-1],
                                                  KIND=GEGLU_TANH if tanh else GEGLU_ERF,
                                                  HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dz, (dz.float().sum(0) if compute_db else None)


AOT_SPECS = [{"kernel": kernel, "signature": declared_signature(kernel, dtype), "num_warps": NUM_WARPS,
              "constexprs": {"KIND": kind, "HAS_BIAS": True, "BLOCK": BLOCK}}
             for kernel in (gelu_fwd_kernel, gelu_bwd_kernel) for dtype in AOT_DTYPES
             for kind in (GEGLU_TANH, GEGLU_ERF)]
