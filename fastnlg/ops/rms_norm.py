"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (weight + offset)   (offset=1.0: Gemma's 1 + w).

Backward (derived here, gradchecked in fp64 in tests/ops/test_rms_norm.py), with r the per-row rstd:
    g = dy * (w + offset);  dx = r * g - x * r^3 * mean(g * x);  dw = sum_rows(dy * x * r)
Backends: Triton (kernels/rms_norm.py), C++ (csrc/cpu/norms.cpp), torch (below, the spec).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ._checks import check_last_dim, check_same_device, check_tensor
from ._dispatch import native_dtype, ptr, rows, to_native

BACKENDS = ("torch", "triton", "cpp")


def rms_norm_reference(x, weight, eps=1e-6, offset=0.0):
    """The spec: plain torch, computed in fp32 (fp64 for fp64 input), cast back to x.dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (weight.to(acc) + offset)).to(x.dtype)


def _fwd_torch(x2, weight, eps, offset):
    acc = native_dtype(x2)
    xf = x2.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[:, None] * (weight.to(acc) + offset)).to(x2.dtype), rstd


def _bwd_torch(dy2, x2, weight, rstd, offset, compute_dw):
    acc = rstd.dtype
    xf, dyf, r = x2.to(acc), dy2.to(acc), rstd[:, None]
    g = dyf * (weight.to(acc) + offset)
    dx = r * g - xf * r.pow(3) * (g * xf).mean(-1, keepdim=True)
    dw = (dyf * xf * r).sum(0) if compute_dw else None
    return dx.to(x2.dtype), dw


def _fwd_cpp(x2, weight, eps, offset):
    from fastnlg import _C

    acc = native_dtype(x2)
    xn, wn = to_native(x2, acc), to_native(weight, acc)
    y = torch.empty_like(xn)
    rstd = torch.empty(xn.shape[0], dtype=acc)
    _C.rms_norm_fwd(ptr(xn), ptr(wn), ptr(y), ptr(rstd), xn.shape[0], xn.shape[1], eps, offset, acc == torch.float64)
    return y.to(x2.dtype), rstd


def _bwd_cpp(dy2, x2, weight, rstd, offset, compute_dw):
    from fastnlg import _C

    acc = rstd.dtype
    dyn, xn, wn = to_native(dy2, acc), to_native(x2, acc), to_native(weight, acc)
    dx = torch.empty_like(xn)
    dw = torch.empty(xn.shape[1], dtype=acc) if compute_dw else None
    _C.rms_norm_bwd(ptr(dyn), ptr(xn), ptr(wn), ptr(rstd), ptr(dx), ptr(dw), xn.shape[0], xn.shape[1], offset,
                    acc == torch.float64)
    return dx.to(x2.dtype), dw


def _fwd_triton(x2, weight, eps, offset):
    from fastnlg.kernels import rms_norm as k

    return k.forward(x2, weight.contiguous(), eps, offset)


def _bwd_triton(dy2, x2, weight, rstd, offset, compute_dw):
    from fastnlg.kernels import rms_norm as k

    return k.backward(rows(dy2), x2, weight.contiguous(), rstd, offset, compute_dw)


_FWD = {"torch": _fwd_torch, "cpp": _fwd_cpp, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpp": _bwd_cpp, "triton": _bwd_triton}


@torch.library.custom_op("fastnlg::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = rows(x)
    y, rstd = _FWD[_backend.choose("rms_norm", x, BACKENDS)](x2, weight, eps, offset)
    return y.view(x.shape), rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty((n,), dtype=acc)


@torch.library.custom_op("fastnlg::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                  compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _BWD[_backend.choose("rms_norm", x, BACKENDS)](rows(dy), rows(x), weight, rstd, offset, compute_dw)
    dw = dw.to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset, compute_dw):
    return torch.empty_like(x), (torch.empty_like(weight) if compute_dw else weight.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, eps, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = torch.ops.fastnlg.rms_norm_bwd(dy, x, weight, rstd, ctx.offset, compute_dw)
    return dx, (dw if compute_dw else None), None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of x (…, C) with weight (C,); output has x's dtype."""
    check_tensor("rms_norm", "x", x, min_ndim=1)
    check_tensor("rms_norm", "weight", weight)
    check_last_dim("rms_norm", "weight", weight, x.shape[-1], f"x {tuple(x.shape)}")
    check_same_device("rms_norm", x=x, weight=weight)
    return torch.ops.fastnlg.rms_norm_fwd(x, weight, float(eps), float(offset))[0]
