"""GELU with a fused bias: gelu(x + bias) over the last dim, the activation of GPT-2's MLP after c_fc.

    y = gelu(z),  z = x + bias (bias (C,) added to every row of x (..., C); no bias: z = x)
    approximate="tanh" (GPT-2's gelu_new, gelu_pytorch_tanh) or "none" (erf), as F.gelu
Backward (gradchecked in fp64 in tests/ops/test_gelu.py): dz = dy * gelu'(z);  dx = dz;  dbias = sum_rows(dz).
z is recomputed from the saved x and bias (nothing else is saved). Computed in fp32 (fp64 for fp64) and
rounded once: z is never rounded to the input dtype, unlike a bias add followed by F.gelu.
Backends: Triton (kernels/gelu.py), C++ (csrc/cpu/activations.cpp), torch (below: aten's gelu /
gelu_backward). On CPU the tanh form defaults to C++: one vectorised pass each way with the bias add inside
(its exp is fastnlg's polynomial, built per x86-64 level), bf16/fp16 read and written in place, where torch
takes separate passes. The erf form keeps torch as its CPU default: aten's erf is vectorised, the C++ loop
calls glibc's scalar erf; FASTNLG_BACKEND=cpp still selects it. (Measurements: benchmarks/bench_gelu.py,
benchmarks/results/cpu-backend-choices.md.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .._checks import check_last_dim, check_same_device, check_same_dtype, check_tensor
from .._native import cast, contiguous, dtype_code, native_dtype, ptr, rows, shaped
from ._eager import define_op

BACKENDS = ("torch", "triton", "cpp")
APPROXIMATE = ("tanh", "none")


def gelu_reference(x, bias=None, approximate="tanh"):
    acc = native_dtype(x)
    z = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    return F.gelu(z, approximate=approximate).to(x.dtype)


def _z(x2, bias, acc):
    return x2.to(acc) if bias is None else x2.to(acc) + bias.to(acc)


def _fwd_torch(x2, bias, tanh):
    return F.gelu(_z(x2, bias, native_dtype(x2)), approximate="tanh" if tanh else "none").to(x2.dtype)


def _bwd_torch(dy2, x2, bias, tanh, compute_db):
    acc = native_dtype(x2)
    dz = torch.ops.aten.gelu_backward(dy2.to(acc), _z(x2, bias, acc), approximate="tanh" if tanh else "none")
    return dz.to(x2.dtype), (dz.sum(0) if compute_db else None)


# The C++ loops read x, bias and dy as they are stored (bf16/fp16 load to fp32), write y in x's dtype (rounded
# once on the store) and dz in the accumulation dtype: the bias gradient sums it before any rounding.
def _fwd_cpp(x2, bias, tanh):
    from fastnlg import _C

    x, b = contiguous(x2), None if bias is None else contiguous(cast(bias, x2.dtype))
    y = torch.empty_like(x)
    _C.gelu_fwd(ptr(x), ptr(b), ptr(y), x.shape[0], x.shape[1], tanh, dtype_code(x.dtype))
    return y


def _bwd_cpp(dy2, x2, bias, tanh, compute_db):
    from fastnlg import _C

    x = contiguous(x2)
    d, b = contiguous(cast(dy2, x.dtype)), None if bias is None else contiguous(cast(bias, x.dtype))
    dz = torch.empty(x.shape, dtype=native_dtype(x))
    _C.gelu_bwd(ptr(d), ptr(x), ptr(b), ptr(dz), x.shape[0], x.shape[1], tanh, dtype_code(x.dtype))
    return cast(dz, x2.dtype), (dz.sum(0) if compute_db else None)


def _fwd_triton(x2, bias, tanh):
    from fastnlg.kernels import gelu as k

    return k.forward(x2.contiguous(), None if bias is None else bias.contiguous(), tanh)


def _bwd_triton(dy2, x2, bias, tanh, compute_db):
    from fastnlg.kernels import gelu as k

    return k.backward(dy2.contiguous(), x2.contiguous(), None if bias is None else bias.contiguous(), tanh,
                      compute_db)


_FWD = {"torch": _fwd_torch, "cpp": _fwd_cpp, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpp": _bwd_cpp, "triton": _bwd_triton}


def _backend_for(x, tanh):
    return _backend.choose("gelu", x, BACKENDS, cpu_default_cpp=tanh)  # (see the docstring)


def gelu_backend(x: torch.Tensor, approximate: str = "tanh") -> str:
    """The backend `gelu` runs on for tensors like x (modules that would only wrap aten's own GELU on the
    torch backend run the eager computation instead)."""
    return _backend_for(x, approximate == "tanh")


def _gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, tanh: bool) -> torch.Tensor:
    return shaped(_FWD[_backend_for(x, tanh)](rows(x), bias, tanh), x.shape)


def _gelu_fwd_fake(x, bias, tanh):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, tanh: bool,
              compute_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, db = _BWD[_backend_for(x, tanh)](rows(dy), rows(x), bias, tanh, compute_db)
    return shaped(dx, x.shape), (cast(db, bias.dtype) if compute_db else x.new_empty(0))


def _gelu_bwd_fake(dy, x, bias, tanh, compute_db):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            bias.new_empty(bias.shape) if compute_db else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, bias, tanh = inputs
    ctx.save_for_backward(x, bias)
    ctx.tanh = tanh


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    compute_db = bias is not None and ctx.needs_input_grad[1]
    dx, db = _GELU.backward(dy, x, bias, ctx.tanh, compute_db)
    return dx, (db if compute_db else None), None


_GELU = define_op("gelu", _gelu_fwd, _gelu_fwd_fake, _gelu_bwd, _gelu_bwd_fake, _setup, _backward)


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x + bias) with bias (C,) broadcast over the rows of x (..., C); see the module docstring."""
    op = "gelu"
    check_tensor(op, "x", x, min_ndim=1)
    if approximate not in APPROXIMATE:
        raise ValueError(f"{op}: approximate must be 'tanh' or 'none', got {approximate!r}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_last_dim(op, "bias", bias, x.shape[-1], f"x {tuple(x.shape)}")
        check_same_dtype(op, x=x, bias=bias)
        check_same_device(op, x=x, bias=bias)
    return _GELU.forward(x, bias, approximate == "tanh")
