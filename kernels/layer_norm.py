"""LayerNorm (GPT-2, OPT, Phi), and residual add + LayerNorm (BERT's post-LN sublayer output), forward and
backward.

Forward, one program per row n of X (N, C); with a residual R the row is first X + R, rounded to the sum's
dtype as eager's add rounds it and stored to S (the backward reads it), then normalised:
    mu_n = sum_c X[n,c] / C;  r_n = (sum_c (X[n,c] - mu_n)^2 / C + eps)^-1/2    -> MEAN[n], RSTD[n] (fp32)
    xh = (X[n,:] - mu_n) * r_n;  Y[n,:] = xh * W + B
Backward, G persistent programs over contiguous spans of rows:
    g = dY[n,:] * W
    dX[n,:] = r_n * (g - sum(g)/C - xh * sum(g * xh)/C)
    DW_PARTIAL[p,:] = sum_{n in span p} dY[n,:] * xh;  DB_PARTIAL[p,:] = sum_{n in span p} dY[n,:]
    dW, dB = column sums of the partials (stage 2, in torch)
With a residual, X is the stored sum S; the gradient of the sum output (when the caller uses it), dS, is
added to dX: d(x) = d(residual) = dX + dS.
"""
import torch
import triton
import triton.language as tl

from ._launch import num_programs, row_block, row_specs


@triton.jit
def layer_norm_fwd_kernel(X, R, W, B, Y, S, MEAN, RSTD, stride_x, stride_r, stride_y, stride_s, C, eps,
                          HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DS, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x, stride_ds, stride_dx,
                          N, C, rows_per_program, HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr,
                          COMPUTE_DB: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        if row < N:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xh = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            dx = rstd * (g - tl.sum(g, axis=0) / C - xh * (tl.sum(g * xh, axis=0) / C))
            if HAS_DS:
                dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * xh
            if COMPUTE_DB:
                db += dy
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * C + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * C + cols, db, mask=mask)


def forward(x, weight, bias, eps, residual=None):
    """x (N, C) unit column stride -> (y, mean (N,) fp32, rstd (N,) fp32, s); with residual (N, C) the rows
    normalised are s = x + residual (stored in their promoted dtype, as is y), else s is None."""
    N, C = x.shape
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((N, C), dtype=dtype, device=x.device)
    s = None if residual is None else torch.empty((N, C), dtype=dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        block, warps = row_block(C)
        r, out_s = (x, y) if residual is None else (residual, s)  # (unused pointers without a residual)
        layer_norm_fwd_kernel[(N,)](x, r, weight, bias if bias is not None else weight, y, out_s, mean, rstd,
                                    x.stride(0), r.stride(0), y.stride(0), out_s.stride(0), C, eps,
                                    HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_C=block,
                                    num_warps=warps)
    return y, mean, rstd, s


def backward(dy, x, weight, mean, rstd, compute_dw: bool, compute_db: bool, ds=None):
    """-> (dx (+ ds when given), dw fp32 or None, db fp32 or None)."""
    N, C = x.shape
    dx = torch.empty_like(x)
    if N == 0:
        zero = torch.zeros(C, dtype=torch.float32, device=x.device)
        return dx, (zero if compute_dw else None), (zero.clone() if compute_db else None)
    block, warps = row_block(C, heavy=True)
    rows_per_program = triton.cdiv(N, num_programs(x.device, N))
    G = triton.cdiv(N, rows_per_program)
    dw = torch.empty((G, C) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    db = torch.empty((G, C) if compute_db else (1,), dtype=torch.float32, device=x.device)
    d_s = dy if ds is None else ds
    layer_norm_bwd_kernel[(G,)](dy, x, weight, mean, rstd, d_s, dx, dw, db, dy.stride(0), x.stride(0), d_s.stride(0),
                                dx.stride(0), N, C, rows_per_program, HAS_DS=ds is not None, COMPUTE_DW=compute_dw,
                                COMPUTE_DB=compute_db, BLOCK_C=block, num_warps=warps)
    return dx, (dw.sum(0) if compute_dw else None), (db.sum(0) if compute_db else None)


_FWD_SIGNATURE = {"X": None, "R": None, "W": None, "B": None, "Y": None, "S": None, "MEAN": "*fp32", "RSTD": "*fp32",
                  "stride_x": "i64", "stride_r": "i64", "stride_y": "i64", "stride_s": "i64", "C": "i32",
                  "eps": "fp32", "HAS_RESIDUAL": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_C": "constexpr"}
_BWD_SIGNATURE = {"DY": None, "X": None, "W": None, "MEAN": "*fp32", "RSTD": "*fp32", "DS": None, "DX": None,
                  "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "stride_dy": "i64", "stride_x": "i64",
                  "stride_ds": "i64", "stride_dx": "i64", "N": "i32", "C": "i32", "rows_per_program": "i32",
                  "HAS_DS": "constexpr", "COMPUTE_DW": "constexpr", "COMPUTE_DB": "constexpr",
                  "BLOCK_C": "constexpr"}
AOT_SPECS = tuple(  # plain and with the residual (add_layer_norm): the residual variant holds more in registers
    spec
    for residual in (False, True)
    for spec in (
        row_specs(layer_norm_fwd_kernel, _FWD_SIGNATURE, dtype_args=("X", "R", "W", "B", "Y", "S"),
                  extra_constexprs={"HAS_RESIDUAL": residual, "HAS_BIAS": True})
        + row_specs(layer_norm_bwd_kernel, _BWD_SIGNATURE, dtype_args=("DY", "X", "W", "DS", "DX"),
                    extra_constexprs={"HAS_DS": residual, "COMPUTE_DW": True, "COMPUTE_DB": True}, heavy=True)
    )
)
