"""LoRA linear with a frozen dense or NF4 base weight, as one autograd op.

    y = x W^T + b + s (d(x) A^T) B^T,   d(x) = x * m / (1 - p)   (dropout, keep mask m),
    x (..., in), W (out, in) dense or NF4Weight, A (r, in), B (out, r) as PEFT stores them, s = scaling.
Backward (W frozen; gradchecked in fp64 against autograd of the reference in tests/ops/test_lora_linear.py):
    u = d(x) A^T (N, r);  g = dy B (N, r)
    dB = s dy^T u;   dA = s g^T d(x);   dx = dy W + s (g A) * m / (1 - p);   db = sum_N dy
Saved for backward (and nothing else): x itself (the caller's tensor: q/k/v projections of one input share it;
PEFT saves a dropout copy per adapter), u (N x r), the dropout RNG seed (the mask m is regenerated, not
stored) and the weights. The NF4 base is never dequantised whole: Triton dequantises tile by tile inside the
matmul (kernels/nf4_matmul.py, on CUDA and under the interpreter) and the torch path (CPU) dequantises
blocks of output rows of at most DEQUANT_CHUNK_BYTES through the NF4 dequantise backend. On Triton the LoRA
term s u B^T is added in the NF4 matmul's epilogue, so y is written once.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ._checks import check_same_device, check_tensor

BACKENDS = ("torch", "triton")
DEQUANT_CHUNK_BYTES = 64 * 2**20


def _is_nf4(weight) -> bool:
    from ..quant import NF4Weight

    return isinstance(weight, NF4Weight)


def _dequant_rows(weight, absmax, r0: int, r1: int, dtype) -> torch.Tensor:
    """Rows [r0, r1) of an NF4 weight (out, in) with its fp32 absmax, dequantised through the NF4 backend
    (C++ on CPU) on the whole quantisation blocks that cover them (rows need not start on a block)."""
    from ..quant import NF4Weight

    cols, bs, n = weight.shape[1], weight.blocksize, weight.shape[0] * weight.shape[1]
    e0, e1 = r0 * cols, r1 * cols
    b0, b1 = e0 // bs, -(-e1 // bs)  # the blocks elements [e0, e1) lie in; block starts are even
    f0, f1 = b0 * bs, min(n, b1 * bs)
    part = NF4Weight(weight.packed[f0 // 2: f1 // 2], absmax[b0:b1], (f1 - f0,), dtype, bs)
    return part.dequantize(dtype)[e0 - f0: e1 - f0].reshape(r1 - r0, cols)


def _row_chunks(weight, dtype):
    """Row blocks of at most DEQUANT_CHUNK_BYTES, with the fp32 absmax decoded once."""
    rows, cols = weight.shape
    per = max(1, DEQUANT_CHUNK_BYTES // max(1, cols * (torch.finfo(dtype).bits // 8 + 16)))
    absmax = weight.absmax_fp32().float()
    return [(absmax, r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]


def base_matmul(x2, weight, bias=None):
    """x2 (N, in) @ W^T (+ b) for dense or NF4 W (torch path: NF4 in row blocks)."""
    if not _is_nf4(weight):
        return torch.nn.functional.linear(x2, weight, bias)
    if _backend.choose("lora_linear", x2, BACKENDS) == "triton":
        from fastnlg.kernels import nf4_matmul

        return nf4_matmul.matmul_nt(x2, weight, bias)
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x2.dtype, device=x2.device)
    for absmax, r0, r1 in _row_chunks(weight, x2.dtype):
        torch.matmul(x2, _dequant_rows(weight, absmax, r0, r1, x2.dtype).t(), out=y[:, r0:r1])
    if bias is not None:
        y += bias
    return y


def _base_plus_lora(x2, weight, bias, u, lora_B, scaling):
    """x2 W^T + b + s u B^T. NF4 on Triton: the LoRA term is added in the matmul's epilogue (y written once);
    otherwise the base product is followed by an in-place addmm into the same y."""
    if _is_nf4(weight) and _backend.choose("lora_linear", x2, BACKENDS) == "triton":
        from fastnlg.kernels import nf4_matmul

        if u.shape[1] <= nf4_matmul.MAX_RANK:
            return nf4_matmul.matmul_nt(x2, weight, bias, lora_u=u, lora_B=lora_B, scaling=scaling)
    y = base_matmul(x2, weight, bias)
    return y.addmm_(u, lora_B.t(), alpha=scaling)


def base_matmul_t(dy2, weight):
    """dy2 (N, out) @ W (out, in) for dense or NF4 W: the base part of dx."""
    if not _is_nf4(weight):
        return dy2 @ weight
    if _backend.choose("lora_linear", dy2, BACKENDS) == "triton":
        from fastnlg.kernels import nf4_matmul

        return nf4_matmul.matmul_nn(dy2, weight)
    dx = torch.zeros(dy2.shape[0], weight.shape[1], dtype=dy2.dtype, device=dy2.device)
    for absmax, r0, r1 in _row_chunks(weight, dy2.dtype):
        dx.addmm_(dy2[:, r0:r1], _dequant_rows(weight, absmax, r0, r1, dy2.dtype))
    return dx


def _dropout_mask(seed, shape, p, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= p


def lora_linear_reference(x, weight, lora_A, lora_B, *, scaling, bias=None, dropout_p=0.0, dropout_mask=None):
    """The spec: F.linear(x, W_deq) + b + s * B(A(dropout(x))) in plain torch (dropout_mask: keep mask)."""
    w = weight.dequantize(x.dtype) if _is_nf4(weight) else weight
    xd = x
    if dropout_p > 0:
        xd = x * dropout_mask / (1 - dropout_p)
    return torch.nn.functional.linear(x, w, bias) + scaling * ((xd @ lora_A.t()) @ lora_B.t())


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, weight, scaling, dropout_p):
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        seed = None
        xd = x2
        if dropout_p > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            xd = x2 * _dropout_mask(seed, x2.shape, dropout_p, x2.device) / (1 - dropout_p)
        u = xd @ lora_A.t()  # (N, r)
        y = _base_plus_lora(x2, weight, bias, u, lora_B, scaling)
        ctx.save_for_backward(x, u, lora_A, lora_B)
        ctx.weight, ctx.scaling, ctx.p, ctx.seed, ctx.has_bias = weight, scaling, dropout_p, seed, bias is not None
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        mask = _dropout_mask(ctx.seed, x2.shape, p, x2.device) if p > 0 else None
        g = dy2 @ lora_B  # (N, r)
        d_b = (dy2.t() @ u) * s if ctx.needs_input_grad[2] else None
        d_a = None
        if ctx.needs_input_grad[1]:
            xd = x2 if mask is None else x2 * mask / (1 - p)
            d_a = (g.t() @ xd) * s
        dx = None
        if ctx.needs_input_grad[0]:
            lora_dx = (g @ lora_A) * s
            if mask is not None:
                lora_dx = lora_dx * mask / (1 - p)
            dx = (base_matmul_t(dy2, ctx.weight) + lora_dx).reshape(x.shape)
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, d_a, d_b, db, None, None, None


def lora_linear(x, weight, lora_A, lora_B, *, scaling, bias=None, dropout_p=0.0):
    """x (..., in) -> (..., out); see the module docstring. `weight` is dense (out, in) or an NF4Weight and is
    never differentiated (frozen base)."""
    op = "lora_linear"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "lora_A", lora_A, ndim=2)
    check_tensor(op, "lora_B", lora_B, ndim=2)
    if _is_nf4(weight):
        if len(weight.shape) != 2:
            raise ValueError(f"{op}: the NF4 weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
    else:
        check_tensor(op, "weight", weight, ndim=2)
        out_f, in_f = weight.shape
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: the base weight is frozen here; it requires grad (use F.linear + LoRA to "
                             "train it, or weight.requires_grad_(False))")
        if weight.dtype != x.dtype:
            raise ValueError(f"{op}: x is {x.dtype} but weight is {weight.dtype}")
    r = lora_A.shape[0]
    if x.shape[-1] != in_f or lora_A.shape[1] != in_f or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"{op}: shapes do not chain: x {tuple(x.shape)}, weight (out, in) = {(out_f, in_f)}, "
                         f"lora_A (r, in) {tuple(lora_A.shape)}, lora_B (out, r) {tuple(lora_B.shape)}")
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:
        raise ValueError(f"{op}: x, lora_A and lora_B must share a dtype, got {x.dtype}, {lora_A.dtype}, "
                         f"{lora_B.dtype} (cast the adapter, as PEFT's autocast_adapter_dtype does)")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must have out = {out_f} entries")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    check_same_device(op, x=x, lora_A=lora_A, lora_B=lora_B, bias=bias,
                      weight=weight.packed if _is_nf4(weight) else weight)
    return _LoRALinear.apply(x, lora_A, lora_B, bias, weight, float(scaling), float(dropout_p))
