"""LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias  (biased variance, as torch).

Backward (gradchecked in fp64 in tests/ops/test_layer_norm.py), r = rstd, xh = (x - mean) * r:
    g = dy * w;  dx = r * (g - mean(g) - xh * mean(g * xh));  dw = sum_rows(dy * xh);  db = sum_rows(dy)
Backends: Triton (kernels/layer_norm.py), C++ (csrc/cpu/norms.cpp), torch (below: aten's native_layer_norm
and its backward in the accumulation dtype). On CPU the default is torch: aten's vectorised kernels beat our
C++ loop (benchmarks/bench_layer_norm.py; benchmarks/results/cpu-backend-choices.md); FASTNLG_BACKEND=cpp
still selects the C++ kernel.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import check_last_dim, check_same_device, check_tensor
from .._native import cast, native_dtype, ptr, round_code, rows, shaped, to_native
from ._eager import define_op

BACKENDS = ("torch", "triton", "cpp")


def layer_norm_reference(x, weight, bias=None, eps=1e-5):
    acc = native_dtype(x)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc), b, eps).to(x.dtype)


def _sum_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


# The backends also run add_layer_norm (ops/add_layer_norm.py): with r2 (the residual rows) the rows normalised
# are s = x2 + r2, rounded to the promoted dtype as eager's add rounds it, and returned; ds2 in the backward is
# the gradient of that sum output, added to dx.

def _fwd_torch(x2, weight, bias, eps, r2=None):
    """aten's native_layer_norm (vectorised, one pass) in the accumulation dtype, rounded once."""
    s = None if r2 is None else torch.add(x2, r2)  # (aten's add: the promoted dtype, as eager)
    src = x2 if s is None else s
    acc = native_dtype(src)
    b = None if bias is None else cast(bias, acc)
    y, mean, rstd = torch.ops.aten.native_layer_norm(cast(src, acc), [src.shape[1]], cast(weight, acc), b, eps)
    return cast(y, src.dtype), mean.view(-1), rstd.view(-1), s


def _bwd_torch(dy2, x2, weight, mean, rstd, compute_dw, compute_db, ds2=None):
    acc = rstd.dtype
    w = cast(weight, acc)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        cast(dy2, acc), cast(x2, acc), [x2.shape[1]], mean[:, None], rstd[:, None], w, w if compute_db else None,
        [True, compute_dw, compute_db])
    if ds2 is not None:
        dx = dx + cast(ds2, acc)
    return cast(dx, x2.dtype), dw, db


def _fwd_cpp(x2, weight, bias, eps, r2=None):
    from fastnlg import _C

    dtype = _sum_dtype(x2, r2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xn, wn, bn, rn = to_native(x2, acc), to_native(weight, acc), to_native(bias, acc), to_native(r2, acc)
    y = torch.empty_like(xn)
    total = None if r2 is None else torch.empty_like(xn)
    mean, rstd = torch.empty(xn.shape[0], dtype=acc), torch.empty(xn.shape[0], dtype=acc)
    _C.layer_norm_fwd(ptr(xn), ptr(rn), ptr(wn), ptr(bn), ptr(y), ptr(total), ptr(mean), ptr(rstd), xn.shape[0],
                      xn.shape[1], eps, round_code(dtype), acc == torch.float64)
    return cast(y, dtype), mean, rstd, (None if total is None else cast(total, dtype))


def _bwd_cpp(dy2, x2, weight, mean, rstd, compute_dw, compute_db, ds2=None):
    from fastnlg import _C

    acc = rstd.dtype
    dyn, xn, wn, dsn = to_native(dy2, acc), to_native(x2, acc), to_native(weight, acc), to_native(ds2, acc)
    dx = torch.empty_like(xn)
    dw = torch.empty(xn.shape[1], dtype=acc) if compute_dw else None
    db = torch.empty(xn.shape[1], dtype=acc) if compute_db else None
    _C.layer_norm_bwd(ptr(dyn), ptr(xn), ptr(wn), ptr(mean), ptr(rstd), ptr(dsn), ptr(dx), ptr(dw), ptr(db),
                      xn.shape[0], xn.shape[1], acc == torch.float64)
    return cast(dx, x2.dtype), dw, db


def _fwd_triton(x2, weight, bias, eps, r2=None):
    from fastnlg.kernels import layer_norm as k

    return k.forward(x2, weight.contiguous(), None if bias is None else bias.contiguous(), eps, residual=r2)


def _bwd_triton(dy2, x2, weight, mean, rstd, compute_dw, compute_db, ds2=None):
    from fastnlg.kernels import layer_norm as k

    return k.backward(dy2, x2, weight.contiguous(), mean, rstd, compute_dw, compute_db, ds=ds2)


_FWD = {"torch": _fwd_torch, "cpp": _fwd_cpp, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpp": _bwd_cpp, "triton": _bwd_triton}


def _backend_for(x):
    return _backend.choose("layer_norm", x, BACKENDS, cpu_default_cpp=False)  # (C++: opt-in, see above)


def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd, _ = _FWD[_backend_for(x)](rows(x), weight, bias, eps)
    return shaped(y, x.shape), mean, rstd


def _layer_norm_fwd_fake(x, weight, bias, eps):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    acc = native_dtype(x)
    return torch.empty_like(x), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    compute_dw: bool, compute_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _BWD[_backend_for(x)](rows(dy), rows(x), weight, mean, rstd, compute_dw, compute_db)
    dw = cast(dw, weight.dtype) if compute_dw else weight.new_empty(0)
    db = cast(db, weight.dtype) if compute_db else weight.new_empty(0)
    return shaped(dx, x.shape), dw, db


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, compute_dw, compute_db):
    return (torch.empty_like(x), torch.empty_like(weight) if compute_dw else weight.new_empty(0),
            torch.empty_like(weight) if compute_db else weight.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    compute_dw, compute_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dw, db = _LAYER_NORM.backward(dy, x, weight, mean, rstd, compute_dw, compute_db)
    return dx, (dw if compute_dw else None), (cast(db, ctx.bias_dtype) if compute_db else None), None


_LAYER_NORM = define_op("layer_norm", _layer_norm_fwd, _layer_norm_fwd_fake, _layer_norm_bwd, _layer_norm_bwd_fake, _setup, _backward)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (…, C) with weight (C,) and optional bias (C,)."""
    check_tensor("layer_norm", "x", x, min_ndim=1)
    check_tensor("layer_norm", "weight", weight)
    check_last_dim("layer_norm", "weight", weight, x.shape[-1], f"x {tuple(x.shape)}")
    if bias is not None:
        check_tensor("layer_norm", "bias", bias)
        check_last_dim("layer_norm", "bias", bias, x.shape[-1], f"x {tuple(x.shape)}")
    check_same_device("layer_norm", x=x, weight=weight, bias=bias)
    if not torch.compiler.is_compiling() and _backend_for(x) == "torch":
        # the torch backend is aten's layer norm in the accumulation dtype, rounded once: called as it is (with
        # the casts around it for fp16/bf16), its autograd stays in C++, no Python Function around it (half
        # the time of a small call), with the same values and gradients bit for bit
        acc = native_dtype(x)
        y = torch.nn.functional.layer_norm(cast(x, acc), x.shape[-1:], cast(weight, acc),
                                           None if bias is None else cast(bias, acc), eps)
        return cast(y, x.dtype)
    return _LAYER_NORM.forward(x, weight, bias, float(eps))[0]
