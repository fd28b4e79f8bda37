"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (weight + offset)   (offset=1.0: Gemma's 1 + w; weight=None: no
affine scale, y = x / rms(x)).

Casting modes (what the families' eager modules round, for bf16/fp16 x), Liger's names:
    "gemma" (default): normalise and multiply in fp32, cast once at the end; output dtype x.dtype.
    "llama": normalise in fp32, cast x_hat to x.dtype, then multiply by the weight (HF's LlamaRMSNorm,
             Mistral, Qwen): output dtype promote(x.dtype, weight.dtype), as `weight * x_hat.to(x.dtype)`.
The patcher picks the family's mode, so a patched model's forward rounds as the unpatched one does. The
backward is the same exact derivative in both modes (autograd takes the cast's derivative as 1).
`inplace=True` (inference: no gradient) writes y into x.

Backward (derived here, gradchecked in fp64 in tests/ops/test_rms_norm.py), with r the per-row rstd:
    g = dy * (w + offset);  dx = r * g - x * r^3 * mean(g * x);  dw = sum_rows(dy * x * r)
Backends: Triton (kernels/rms_norm.py), C++ (csrc/cpu/norms.cpp), torch (below, the spec).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import check_last_dim, check_same_device, check_tensor
from .._native import cast, native_dtype, ptr, round_code, rows, shaped, to_native
from ._eager import define_op

BACKENDS = ("torch", "triton", "cpp")
CASTING_MODES = ("gemma", "llama")


def rms_norm_reference(x, weight=None, eps=1e-6, offset=0.0, casting_mode="gemma"):
    """The spec: plain torch, normalised in fp32 (fp64 for fp64 input); see the casting modes above."""
    acc = native_dtype(x)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(x.dtype)
    if casting_mode == "llama":
        return (weight + offset) * y.to(x.dtype)
    return (y * (weight.to(acc) + offset)).to(x.dtype)


def _out_dtype(x, weight, cast_xhat):
    return torch.promote_types(x.dtype, weight.dtype) if cast_xhat else x.dtype


def _fwd_torch(x2, weight, eps, offset, cast_xhat, out):
    """The torch backend: rms_norm_reference's math in the kernels' form (rows (n, C), a weight always given,
    y written into `out`, rstd returned for the backward)."""
    acc = native_dtype(x2)
    xf = x2.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    xhat = xf * rstd[:, None]
    if cast_xhat:
        xhat = xhat.to(x2.dtype).to(acc)
    y = (xhat * (weight.to(acc) + offset)).to(out.dtype)
    return out.copy_(y), rstd


def _bwd_torch(dy2, x2, weight, rstd, offset, compute_dw):
    acc = rstd.dtype
    xf, dyf, r = x2.to(acc), dy2.to(acc), rstd[:, None]
    g = dyf * (weight.to(acc) + offset)
    dx = r * g - xf * r.pow(3) * (g * xf).mean(-1, keepdim=True)
    dw = (dyf * xf * r).sum(0) if compute_dw else None
    return dx.to(x2.dtype), dw


def _fwd_cpp(x2, weight, eps, offset, cast_xhat, out):
    from fastnlg import _C

    acc = native_dtype(x2)
    xn, wn = to_native(x2, acc), to_native(weight, acc)
    y = out if out.dtype == acc and out.is_contiguous() else torch.empty_like(xn)  # out may be x2 itself
    rstd = torch.empty(xn.shape[0], dtype=acc)
    _C.rms_norm_fwd(ptr(xn), ptr(wn), ptr(y), ptr(rstd), xn.shape[0], xn.shape[1], eps, offset,
                    round_code(x2.dtype) if cast_xhat else 0, acc == torch.float64)
    return (y if y is out else out.copy_(y)), rstd


def _bwd_cpp(dy2, x2, weight, rstd, offset, compute_dw):
    from fastnlg import _C

    acc = rstd.dtype
    dyn, xn, wn = to_native(dy2, acc), to_native(x2, acc), to_native(weight, acc)
    dx = torch.empty_like(xn)
    dw = torch.empty(xn.shape[1], dtype=acc) if compute_dw else None
    _C.rms_norm_bwd(ptr(dyn), ptr(xn), ptr(wn), ptr(rstd), ptr(dx), ptr(dw), xn.shape[0], xn.shape[1], offset,
                    acc == torch.float64)
    return cast(dx, x2.dtype), dw


def _fwd_triton(x2, weight, eps, offset, cast_xhat, out):
    from fastnlg.kernels import rms_norm as k

    return k.forward(x2, weight.contiguous(), eps, offset, cast_xhat, out=out)


def _bwd_triton(dy2, x2, weight, rstd, offset, compute_dw):
    from fastnlg.kernels import rms_norm as k

    return k.backward(rows(dy2), x2, weight.contiguous(), rstd, offset, compute_dw)


_FWD = {"torch": _fwd_torch, "cpp": _fwd_cpp, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpp": _bwd_cpp, "triton": _bwd_triton}


def _forward(x, weight, eps, offset, cast_xhat, out):
    """y written into `out` (x's shape, unit column stride rows; x itself for in place) and rstd."""
    return _FWD[_backend.choose("rms_norm", x, BACKENDS)](rows(x), weight, eps, offset, cast_xhat,
                                                         out.view(-1, x.shape[-1]))


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                  cast_xhat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, cast_xhat), device=x.device)
    _, rstd = _forward(x, weight, eps, offset, cast_xhat, y)
    return y, rstd


def _rms_norm_fwd_fake(x, weight, eps, offset, cast_xhat):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    acc = native_dtype(x)
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_xhat)), x.new_empty((n,), dtype=acc)


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                  compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _BWD[_backend.choose("rms_norm", x, BACKENDS)](rows(dy), rows(x), weight, rstd, offset, compute_dw)
    dw = cast(dw, weight.dtype) if compute_dw else weight.new_empty(0)
    return shaped(dx, x.shape), dw


def _rms_norm_bwd_fake(dy, x, weight, rstd, offset, compute_dw):
    return torch.empty_like(x), (torch.empty_like(weight) if compute_dw else weight.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, eps, offset, _cast = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = _RMS_NORM.backward(dy, x, weight, rstd, ctx.offset, compute_dw)
    return dx, (dw if compute_dw else None), None, None, None


_RMS_NORM = define_op("rms_norm", _rms_norm_fwd, _rms_norm_fwd_fake, _rms_norm_bwd, _rms_norm_bwd_fake, _setup, _backward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, offset: float = 0.0, *,
             casting_mode: str = "gemma", inplace: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim of x (…, C) with weight (C,) or None (no affine scale); see the module
    docstring for casting_mode and inplace."""
    op = "rms_norm"
    check_tensor(op, "x", x, min_ndim=1)
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{op}: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    if weight is None:
        if offset:
            raise ValueError(f"{op}: offset={offset} scales a weight; with weight=None there is none")
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    check_tensor(op, "weight", weight)
    check_last_dim(op, "weight", weight, x.shape[-1], f"x {tuple(x.shape)}")
    check_same_device(op, x=x, weight=weight)
    cast_xhat = casting_mode == "llama"
    if not inplace:
        return _RMS_NORM.forward(x, weight, float(eps), float(offset), cast_xhat)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError(f"{op}: inplace=True is for inference; x or weight requires grad (run under "
                         "torch.no_grad(), or use inplace=False)")
    if _out_dtype(x, weight, cast_xhat) != x.dtype:
        raise ValueError(f"{op}: casting_mode='llama' gives {_out_dtype(x, weight, cast_xhat)} for x {x.dtype} and "
                         f"weight {weight.dtype}: it cannot be written into x")
    if not x.is_contiguous():
        raise ValueError(f"{op}: inplace=True needs a contiguous x, got strides {x.stride()}")
    _forward(x, weight, float(eps), float(offset), cast_xhat, x)
    return x
