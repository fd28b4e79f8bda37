"""Gated activations y = act(gate) * up (SwiGLU for Llama/Mistral/Qwen, GeGLU for Gemma), elementwise.

    SwiGLU:      act(g) = g * s,          s = sigmoid(g);     act'(g) = s * (1 + g * (1 - s))
    GeGLU tanh:  act(g) = g * S,          S = sigmoid(2z), z = k (g + 0.044715 g^3), k = sqrt(2/pi)
                 (0.5 (1 + tanh z) == sigmoid(2z): no cancellation near 0)
                 act'(g) = S + 2 g S (1 - S) k (1 + 3 * 0.044715 g^2)
    GeGLU erf:   act(g) = g * Phi(g);     act'(g) = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi)
Backward: dgate = dy * up * act'(g), dup = dy * act(g); act is recomputed, nothing extra is saved.
ROUND_ACT (eager's rounding): act(g) is rounded to the input dtype before the multiply by up.
Tiling: flat index over the n = gate.numel() values, BLOCK per program, fp32 math.
"""
import torch
import triton
import triton.language as tl

from ._launch import AOT_DTYPES, TRITON_DTYPE
from .glu_kinds import GEGLU_ERF, GEGLU_TANH, SWIGLU

_SWIGLU, _GEGLU_TANH = tl.constexpr(SWIGLU), tl.constexpr(GEGLU_TANH)  # readable inside @triton.jit

BLOCK, NUM_WARPS = 1024, 4


@triton.jit
def _act_and_grad(g, KIND: tl.constexpr):
    if KIND == _SWIGLU:
        s = tl.sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    elif KIND == _GEGLU_TANH:
        k = 0.7978845608028654
        S = tl.sigmoid(2.0 * k * (g + 0.044715 * g * g * g))
        act = g * S
        dact = S + 2.0 * g * S * (1.0 - S) * k * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        dact = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return act, dact


@triton.jit
def glu_fwd_kernel(GATE, UP, Y, n, KIND: tl.constexpr, ROUND_ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, KIND)
    if ROUND_ACT:
        act = act.to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(DY, GATE, UP, DGATE, DUP, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, KIND)
    tl.store(DGATE + offs, (dy * u * dact).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dy * act).to(DUP.dtype.element_ty), mask=mask)


def forward(gate: torch.Tensor, up: torch.Tensor, kind: int, round_act: bool = False) -> torch.Tensor:
    """gate, up contiguous, same shape and dtype."""
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        glu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, KIND=kind, ROUND_ACT=round_act, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
    return y


def backward(dy, gate, up, kind: int):
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        glu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, KIND=kind, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
    return dgate, dup


def _specs():
    specs = []
    for dtype in AOT_DTYPES:
        t = "*" + TRITON_DTYPE[dtype]
        for kind in (SWIGLU, GEGLU_TANH, GEGLU_ERF):
            c = {"KIND": kind, "BLOCK": BLOCK}
            for round_act in (False, True):
                specs.append({"kernel": glu_fwd_kernel, "num_warps": NUM_WARPS, "constexprs": {**c, "ROUND_ACT": round_act},
                              "signature": {"GATE": t, "UP": t, "Y": t, "n": "i64", "KIND": "constexpr",
                                            "ROUND_ACT": "constexpr", "BLOCK": "constexpr"}})
            specs.append({"kernel": glu_bwd_kernel, "num_warps": NUM_WARPS, "constexprs": c, "signature": {
                "DY": t, "GATE": t, "UP": t, "DGATE": t, "DUP": t, "n": "i64", "KIND": "constexpr",
                "BLOCK": "constexpr"}})
    return specs


AOT_SPECS = _specs()
