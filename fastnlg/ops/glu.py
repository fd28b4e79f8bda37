"""Gated MLP activations: swiglu(gate, up) = silu(gate) * up;  geglu(gate, up) = gelu(gate) * up.

Backward (gradchecked in fp64 in tests/ops/test_glu.py): dgate = dy * up * act'(gate), dup = dy * act(gate),
with act' written out in kernels/glu.py. Backends: Triton (kernels/glu.py), C++ (csrc/cpu/activations.cpp),
torch (below: aten's activation kernels). On CPU the default is C++: one vectorised pass each way (its exp
is a polynomial, built per x86-64 level), where torch takes 2 ops forward and 4 backward; bf16/fp16 are read
and written in place (loaded to fp32, rounded once on the store: the bits of fp32 copies and .to()). The
erf GeGLU keeps torch as its CPU default: its C++ loop calls glibc's scalar erf, aten's is vectorised;
FASTNLG_BACKEND=cpp still selects it. (Measurements: benchmarks/bench_glu.py,
benchmarks/results/cpu-backend-choices.md.)

Rounding: by default act(gate) * up is computed in fp32 and rounded once (more accurate than eager). For
bf16/fp16 inputs eager rounds act(gate) to the input dtype first (F.silu returns bf16), which differs from
the single rounding by one ulp in a quarter of the elements; `eager_rounding=True` rounds as eager does, for
parity with the unpatched module: bit for bit for SwiGLU on every backend and for bf16 GeGLU on the torch
backend (which then calls F.gelu; torch's own fp16 CPU erf-GELU rounds differently again, ~95%). The Triton
and C++ GeGLU keep their cancellation-free sigmoid form of the tanh approximation, whose last fp32 bits differ
from torch's 0.5 g (1 + tanh z), so they agree with eager in ~93-97% of bf16/fp16 elements instead of ~71%.
The backward is the exact derivative in both modes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .._checks import check_same_device, check_same_dtype, check_same_shape, check_tensor
from .._native import cast, contiguous, dtype_code, native_dtype, ptr, round_code, shaped
from ..kernels.glu_kinds import GEGLU_ERF, GEGLU_TANH, SWIGLU
from ._eager import define_op

BACKENDS = ("torch", "triton", "cpp")
KINDS = {"swiglu": SWIGLU, "geglu_tanh": GEGLU_TANH, "geglu_none": GEGLU_ERF}


def swiglu_reference(gate, up):
    acc = native_dtype(gate)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def geglu_reference(gate, up, approximate="tanh"):
    acc = native_dtype(gate)
    return (F.gelu(gate.to(acc), approximate=approximate) * up.to(acc)).to(gate.dtype)


# The torch backend runs aten's vectorised activation kernels and their fused backwards (silu_backward,
# gelu_backward): fewer passes over the (tokens x intermediate) tensors than writing act' out in torch ops.
_ACT = {SWIGLU: F.silu, GEGLU_TANH: lambda g: F.gelu(g, approximate="tanh"), GEGLU_ERF: F.gelu}
_ACT_BACKWARD = {SWIGLU: torch.ops.aten.silu_backward,
                 GEGLU_TANH: lambda d, g: torch.ops.aten.gelu_backward(d, g, approximate="tanh"),
                 GEGLU_ERF: lambda d, g: torch.ops.aten.gelu_backward(d, g)}


def _fwd_torch(gate, up, kind, round_act):
    acc = native_dtype(gate)
    act = _ACT[kind](gate.to(acc))
    if round_act:  # torch's own activation, rounded as eager rounds it
        act = act.to(gate.dtype).to(acc)
    return (act * up.to(acc)).to(gate.dtype)


def _bwd_torch(dy, gate, up, kind):
    acc = native_dtype(gate)
    g, d = gate.to(acc), dy.to(acc)
    return _ACT_BACKWARD[kind](d * up.to(acc), g).to(gate.dtype), (d * _ACT[kind](g)).to(up.dtype)


# The C++ loops read and write fp32, fp64, bf16 and fp16 tensors as they are (a bf16 value loads to fp32, the
# result rounds once on the store, as computing in fp32 and calling .to() would): no fp32 copies in and out.
def _fwd_cpp(gate, up, kind, round_act):
    from fastnlg import _C

    g, u = contiguous(gate), contiguous(up)
    y = torch.empty_like(g)
    _C.glu_fwd(ptr(g), ptr(u), ptr(y), g.numel(), kind, round_code(gate.dtype) if round_act else 0,
               dtype_code(g.dtype))
    return y


def _bwd_cpp(dy, gate, up, kind):
    from fastnlg import _C

    d, g, u = contiguous(cast(dy, gate.dtype)), contiguous(gate), contiguous(up)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    _C.glu_bwd(ptr(d), ptr(g), ptr(u), ptr(dg), ptr(du), g.numel(), kind, dtype_code(g.dtype))
    return dg, du


def _fwd_triton(gate, up, kind, round_act):
    from fastnlg.kernels import glu as k

    return k.forward(gate.contiguous(), up.contiguous(), kind, round_act)


def _bwd_triton(dy, gate, up, kind):
    from fastnlg.kernels import glu as k

    return k.backward(dy.contiguous(), gate.contiguous(), up.contiguous(), kind)


_FWD = {"torch": _fwd_torch, "cpp": _fwd_cpp, "triton": _fwd_triton}
_BWD = {"torch": _bwd_torch, "cpp": _bwd_cpp, "triton": _bwd_triton}


def _backend_for(gate, kind):
    return _backend.choose("glu", gate, BACKENDS, cpu_default_cpp=kind != GEGLU_ERF)  # (see the docstring)


def _glu_fwd(gate: torch.Tensor, up: torch.Tensor, kind: int, round_act: bool) -> torch.Tensor:
    return shaped(_FWD[_backend_for(gate, kind)](gate, up, kind, round_act), gate.shape)


def _glu_fwd_fake(gate, up, kind, round_act):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _glu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = _BWD[_backend_for(gate, kind)](dy, gate, up, kind)
    return shaped(dg, gate.shape), shaped(du, up.shape)


def _glu_bwd_fake(dy, gate, up, kind):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    gate, up, kind, _round = inputs
    ctx.save_for_backward(gate, up)
    ctx.kind = kind


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _GLU.backward(dy, gate, up, ctx.kind)
    return dg, du, None, None


_GLU = define_op("glu", _glu_fwd, _glu_fwd_fake, _glu_bwd, _glu_bwd_fake, _setup, _backward)


def _check(op, gate, up):
    check_tensor(op, "gate", gate)
    check_tensor(op, "up", up)
    check_same_shape(op, gate=gate, up=up)
    check_same_dtype(op, gate=gate, up=up)
    check_same_device(op, gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, eager_rounding: bool = False) -> torch.Tensor:
    """silu(gate) * up (Llama, Mistral, Qwen MLPs); eager_rounding: see the module docstring."""
    _check("swiglu", gate, up)
    return _GLU.forward(gate, up, KINDS["swiglu"], bool(eager_rounding))


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *,
          eager_rounding: bool = False) -> torch.Tensor:
    """gelu(gate, approximate) * up (Gemma MLPs); approximate is "tanh" or "none" as in F.gelu."""
    _check("geglu", gate, up)
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return _GLU.forward(gate, up, KINDS[f"geglu_{approximate}"], bool(eager_rounding))
