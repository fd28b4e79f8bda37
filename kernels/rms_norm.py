"""RMSNorm (Llama, Mistral, Qwen; Gemma with offset=1), forward and backward.

Forward, one program per row n of X (N, C):
    r_n = (sum_c X[n,c]^2 / C + eps)^-1/2            -> RSTD[n] (fp32, saved for backward)
    Y[n,c] = X[n,c] * r_n * (W[c] + offset)
    (CAST_XHAT, Llama's casting: X[n,c] * r_n is rounded to X's dtype before the multiply; Y may be X itself)
Backward, G = num_programs persistent programs, each over a contiguous span of rows:
    g = dY[n,:] * (W + offset)
    dX[n,:] = r_n * g - X[n,:] * r_n^3 * (sum_c g_c X[n,c]) / C
    DW_PARTIAL[p,:] = sum_{n in span p} dY[n,:] * X[n,:] * r_n      (stage 1, fp32)
    dW = sum_p DW_PARTIAL[p,:]                                        (stage 2, in torch)
The whole row sits in registers: BLOCK_C = next_pow2(C) >= C, masked.
"""
import torch
import triton
import triton.language as tl

from ._launch import num_programs, row_block, row_specs


@triton.jit
def rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, C, eps, offset, CAST_XHAT: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    xhat = x * rstd
    if CAST_XHAT:
        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, N, C, offset,
                        rows_per_program, COMPUTE_DW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        if row < N:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            g = dy * w
            dx = rstd * g - x * (rstd * rstd * rstd * tl.sum(g * x, axis=0) / C)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * x * rstd
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * C + cols, dw, mask=mask)


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_xhat: bool = False, out=None):
    """x (N, C) with unit column stride -> (y (N, C), rstd (N,) fp32); y is `out` when given (x itself for
    in place: the row is read whole before it is written)."""
    N, C = x.shape
    y = torch.empty_like(x) if out is None else out
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, rstd
    block, warps = row_block(C)
    rms_norm_fwd_kernel[(N,)](x, weight, y, rstd, x.stride(0), y.stride(0), C, eps, offset,
                              CAST_XHAT=cast_xhat, BLOCK_C=block, num_warps=warps)
    return y, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float, compute_dw: bool):
    """-> (dx (N, C), dw (C,) fp32 or None)."""
    N, C = x.shape
    dx = torch.empty_like(x)
    if N == 0:
        return dx, (torch.zeros(C, dtype=torch.float32, device=x.device) if compute_dw else None)
    block, warps = row_block(C, heavy=True)
    G = num_programs(x.device, N)
    rows_per_program = triton.cdiv(N, G)
    G = triton.cdiv(N, rows_per_program)
    partial = torch.empty((G, C) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    rms_norm_bwd_kernel[(G,)](dy, x, weight, rstd, dx, partial, dy.stride(0), x.stride(0), dx.stride(0), N, C, offset,
                              rows_per_program, COMPUTE_DW=compute_dw, BLOCK_C=block, num_warps=warps)
    return dx, (partial.sum(0) if compute_dw else None)


_FWD_SIGNATURE = {"X": None, "W": "*fp32", "Y": None, "RSTD": "*fp32", "stride_x": "i64", "stride_y": "i64",
                  "C": "i32", "eps": "fp32", "offset": "fp32", "CAST_XHAT": "constexpr", "BLOCK_C": "constexpr"}
AOT_SPECS = (
    [spec for cast in (False, True) for spec in row_specs(rms_norm_fwd_kernel, _FWD_SIGNATURE, dtype_args=("X", "W", "Y"),
                                                          extra_constexprs={"CAST_XHAT": cast})]
    + row_specs(rms_norm_bwd_kernel,
                {"DY": None, "X": None, "W": "*fp32", "RSTD": "*fp32", "DX": None, "DW_PARTIAL": "*fp32",
                 "stride_dy": "i64", "stride_x": "i64", "stride_dx": "i64", "N": "i32", "C": "i32", "offset": "fp32",
                 "rows_per_program": "i32", "COMPUTE_DW": "constexpr", "BLOCK_C": "constexpr"},
                dtype_args=("DY", "X", "W", "DX"), extra_constexprs={"COMPUTE_DW": True}, heavy=True)
)
