"""Residual add + LayerNorm: y = layer_norm(x + residual), BERT's post-LN sublayer output
`LayerNorm(dropout(dense(h)) + input)`, in one pass each way.

The sum s = x + residual is rounded to promote(x.dtype, residual.dtype) as eager's add rounds it, and the
LayerNorm (ops/layer_norm.py) normalises that rounded sum; y and s have the promoted dtype. `return_sum=True`
returns (y, s) too, for pre-LN stacks that carry the sum on as the next residual.

Backward, with dLN the LayerNorm's input gradient at s (layer_norm.py) and ds the sum output's gradient:
    d(x) = d(residual) = dLN + ds;  dw, db as LayerNorm's (of s)
Backends: the LayerNorm kernels with their residual inputs (kernels/layer_norm.py HAS_RESIDUAL / HAS_DS,
csrc/cpu/norms.cpp res / ds), and torch (aten's add and native_layer_norm). On CPU the default is torch, as
for layer_norm: aten's vectorised kernels beat the C++ loop.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import check_last_dim, check_same_device, check_tensor
from .._native import cast, native_dtype, rows, shaped
from ._eager import define_op
from .layer_norm import _BWD, _FWD, BACKENDS, layer_norm_reference


def _backend_for(x):
    return _backend.choose("add_layer_norm", x, BACKENDS, cpu_default_cpp=False)  # (C++: opt-in, as layer_norm)


def add_layer_norm_reference(x, residual, weight, bias=None, eps=1e-5, return_sum=False):
    """The spec: eager's `F.layer_norm(x + residual)` in the accumulation dtype (the add rounded first)."""
    s = x + residual
    y = layer_norm_reference(s, weight, bias, eps)
    return (y, s) if return_sum else y


def _add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd, s = _FWD[_backend_for(x)](rows(x), weight, bias, eps, rows(residual))
    return shaped(y, x.shape), shaped(s, x.shape), mean, rstd


def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    dtype = torch.promote_types(x.dtype, residual.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), x.new_empty((n,), dtype=acc),
            x.new_empty((n,), dtype=acc))


def _add_layer_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, compute_dw: bool, compute_db: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _BWD[_backend_for(s)](rows(dy), rows(s), weight, mean, rstd, compute_dw, compute_db,
                                       None if ds is None else rows(ds))
    dw = cast(dw, weight.dtype) if compute_dw else weight.new_empty(0)
    db = cast(db, weight.dtype) if compute_db else weight.new_empty(0)
    return shaped(dx, s.shape), dw, db


def _add_layer_norm_bwd_fake(dy, ds, s, weight, mean, rstd, compute_dw, compute_db):
    return (torch.empty_like(s), torch.empty_like(weight) if compute_dw else weight.new_empty(0),
            torch.empty_like(weight) if compute_db else weight.new_empty(0))


def _setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[3])
    ctx.dtypes = (x.dtype, residual.dtype, None if bias is None else bias.dtype)
    ctx.set_materialize_grads(False)  # an unused sum output gets no gradient pass


def _backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dtype_x, dtype_r, dtype_b = ctx.dtypes
    if dy is None:  # (only the sum output was used)
        dy = torch.zeros_like(s)
    compute_dw, compute_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    dx, dw, db = _ADD_LAYER_NORM.backward(dy, ds, s, weight, mean, rstd, compute_dw, compute_db)
    return (cast(dx, dtype_x) if ctx.needs_input_grad[0] else None,
            cast(dx, dtype_r) if ctx.needs_input_grad[1] else None,
            dw if compute_dw else None, cast(db, dtype_b) if compute_db else None, None)


_ADD_LAYER_NORM = define_op("add_layer_norm", _add_layer_norm_fwd, _add_layer_norm_fwd_fake, _add_layer_norm_bwd,
                            _add_layer_norm_bwd_fake, _setup, _backward)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   eps: float = 1e-5, *, return_sum: bool = False):
    """layer_norm(x + residual) over the last dim of x, residual (…, C) (the same shape) with weight (C,) and
    optional bias (C,); with return_sum=True, (y, x + residual). See the module docstring."""
    op = "add_layer_norm"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "residual", residual, min_ndim=1)
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if (x.dtype == torch.float64) != (residual.dtype == torch.float64):
        raise TypeError(f"{op}: x is {x.dtype} and residual {residual.dtype}: fp64 goes with fp64 only")
    check_tensor(op, "weight", weight, ndim=1)
    check_last_dim(op, "weight", weight, x.shape[-1], f"x {tuple(x.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_last_dim(op, "bias", bias, x.shape[-1], f"x {tuple(x.shape)}")
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)
    if not torch.compiler.is_compiling() and _backend_for(x) == "torch":
        # as layer_norm: aten's add and layer norm called as they are, their autograd in C++ (same values)
        s = x + residual
        acc = native_dtype(s)
        y = cast(torch.nn.functional.layer_norm(cast(s, acc), s.shape[-1:], cast(weight, acc),
                                                None if bias is None else cast(bias, acc), eps), s.dtype)
        return (y, s) if return_sum else y
    y, s, _, _ = _ADD_LAYER_NORM.forward(x, residual, weight, bias, float(eps))
    return (y, s) if return_sum else y
