"""LoRA linear with a frozen dense or NF4 base weight, as one autograd op.

    y = x W^T + b + sum_i s_i (d_i(x) A_i^T) B_i^T,   d_i(x) = x * m_i / (1 - p_i)   (dropout, keep mask m_i),
    x (..., in), W (out, in) dense or NF4Weight, A_i (r_i, in), B_i (out, r_i) as PEFT stores them, s_i = scaling
    of adapter i (several active adapters are summed, as PEFT does; one adapter is the usual case).
Backward (W frozen; gradchecked in fp64 against autograd of the reference in tests/ops/test_lora_linear.py):
    u_i = d_i(x) A_i^T (N, r_i);  g_i = dy B_i (N, r_i)
    dB_i = s_i dy^T u_i;   dA_i = s_i g_i^T d_i(x);   dx = dy W + sum_i s_i (g_i A_i) * m_i / (1 - p_i);   db = sum_N dy
Saved for backward (and nothing else): x itself (the caller's tensor: q/k/v projections of one input share it;
PEFT saves a dropout copy per adapter), u = [u_1 .. u_k] (N x sum r_i), one dropout RNG seed per adapter
(the masks m_i are regenerated, not stored) and the weights. The NF4 base is never dequantised whole
(quant/matmul.py); on Triton the LoRA term [s_1 u_1 .. s_k u_k] [B_1 .. B_k]^T is added in the NF4 matmul's
epilogue, so y is written once.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import check_same_device, check_tensor
from ..quant import NF4Weight
from ..quant.matmul import MATMUL_NN, MATMUL_NT
from . import _amp

BACKENDS = ("torch", "triton")  # the NF4 products' backends (quant/matmul.py); dense W runs F.linear / matmul


def _is_nf4(weight) -> bool:
    return isinstance(weight, NF4Weight)


def _backend_for(x):
    return _backend.choose("lora_linear", x, BACKENDS)


def base_matmul(x2, weight, bias=None, u=None, lora_B=None, scaling=1.0, backend=None):
    """x2 W^T + b (+ s u B^T: the LoRA term, added in place into the same y) for dense or NF4 W."""
    if _is_nf4(weight):
        return MATMUL_NT[backend or _backend_for(x2)](x2, weight, bias, u, lora_B, scaling)
    y = torch.nn.functional.linear(x2, weight, bias)
    return y if u is None else y.addmm_(u, lora_B.t(), alpha=scaling)


def base_matmul_t(dy2, weight, backend=None):
    """dy2 (N, out) @ W (out, in) for dense or NF4 W: the base part of dx."""
    if _is_nf4(weight):
        return MATMUL_NN[backend or _backend_for(dy2)](dy2, weight)
    return dy2 @ weight


def _dropout_mask(seed, shape, p, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= p


def _as_adapters(lora_A, lora_B, scaling, dropout_p):
    """One adapter (tensors and numbers) or several (equal-length sequences) as four tuples."""
    if torch.is_tensor(lora_A) or torch.is_tensor(lora_B):
        return (lora_A,), (lora_B,), (scaling,), (dropout_p,)
    As, Bs = tuple(lora_A), tuple(lora_B)
    ss = tuple(scaling) if isinstance(scaling, (list, tuple)) else (scaling,) * len(As)
    ps = tuple(dropout_p) if isinstance(dropout_p, (list, tuple)) else (dropout_p,) * len(As)
    if not len(As) == len(Bs) == len(ss) == len(ps):
        raise ValueError(f"lora_linear: {len(As)} lora_A, {len(Bs)} lora_B, {len(ss)} scalings and {len(ps)} "
                         "dropout_p given: one of each per adapter")
    return As, Bs, ss, ps


def lora_linear_reference(x, weight, lora_A, lora_B, *, scaling, bias=None, dropout_p=0.0, dropout_mask=None):
    """The spec: F.linear(x, W_deq) + b + sum_i s_i * B_i(A_i(dropout_i(x))) in plain torch. One adapter or
    sequences of them (as lora_linear); dropout_mask: the keep mask, or one per adapter."""
    w = weight.dequantize(x.dtype) if _is_nf4(weight) else weight
    As, Bs, ss, ps = _as_adapters(lora_A, lora_B, scaling, dropout_p)
    masks = dropout_mask if isinstance(dropout_mask, (list, tuple)) else (dropout_mask,) * len(As)
    y = torch.nn.functional.linear(x, w, bias)
    for A, B, s, p, m in zip(As, Bs, ss, ps, masks):
        y = y + s * ((_keep(x, m if p > 0 else None, p) @ A.t()) @ B.t())
    return y


def _new_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def _seed_mask(seed, x2, p):
    """The keep mask drawn from `seed` (None: this adapter has no dropout)."""
    return None if seed is None else _dropout_mask(seed, x2.shape, p, x2.device)


def _keep(t, mask, p):
    """Inverted dropout t * m / (1 - p) with keep mask m (None: t itself)."""
    return t if mask is None else t * mask / (1 - p)


def _cat(ts, dim):
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _column_scales(scalings, ranks, like):
    """s_i on the r_i columns of adapter i: a number for one adapter, an (R,) tensor for several."""
    if len(scalings) == 1:
        return scalings[0]
    return torch.cat([torch.full((r,), s, dtype=like.dtype, device=like.device) for s, r in zip(scalings, ranks)])


class _LoRALinear(torch.autograd.Function):
    """Several adapters run as one of rank R = sum r_i: u = [u_1 .. u_k] (N, R), B = [B_1 .. B_k] (out, R),
    each column scaled by its s_i; only the dropout-dependent products (u_i, dA_i, the LoRA part of dx) are
    per adapter, each with its own mask as PEFT draws them."""

    @staticmethod
    def forward(ctx, x, bias, weight, scalings, ps, *adapters):
        k = len(scalings)
        As, Bs = adapters[:k], adapters[k:]
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        seeds = tuple(_new_seed() if p > 0 else None for p in ps)
        backend = _backend_for(x2)
        if k == 0:
            y, u = base_matmul(x2, weight, bias, backend=backend), None
        else:
            u = _cat([_keep(x2, _seed_mask(seed, x2, p), p) @ A.t()
                      for A, seed, p in zip(As, seeds, ps)], 1)  # (N, R)
            sv = _column_scales(scalings, [A.shape[0] for A in As], u)
            y = base_matmul(x2, weight, bias, u if k == 1 else u * sv, _cat(Bs, 1), sv if k == 1 else 1.0,
                            backend=backend)
        ctx.save_for_backward(x, u, *adapters)
        ctx.weight, ctx.scalings, ctx.ps, ctx.seeds, ctx.has_bias = weight, scalings, ps, seeds, bias is not None
        ctx.backend = backend
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, u, *adapters = ctx.saved_tensors
        k, ps, seeds = len(ctx.scalings), ctx.ps, ctx.seeds
        As, Bs = adapters[:k], adapters[k:]
        need_x, need_a, need_b = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:5 + k]), \
            any(ctx.needs_input_grad[5 + k:])
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        dx = base_matmul_t(dy2, ctx.weight, backend=ctx.backend) if need_x else None
        d_as, d_bs = [None] * k, [None] * k
        if k:
            ranks = [A.shape[0] for A in As]
            sv = _column_scales(ctx.scalings, ranks, u)
            gs = (dy2 @ _cat(Bs, 1)) * sv  # (N, R): s_i dy B_i
            if need_b:
                d_bs = list(torch.split(dy2.t() @ (u * sv), ranks, 1))  # dB_i = s_i dy^T u_i
            if all(seed is None for seed in seeds):  # no dropout: one product each over all adapters
                if need_a:
                    d_as = list(torch.split(gs.t() @ x2, ranks, 0))  # dA_i = s_i g_i^T x
                if need_x:
                    dx.addmm_(gs, _cat(As, 0))
            else:
                for i, (g, A, seed, p) in enumerate(zip(torch.split(gs, ranks, 1), As, seeds, ps)):
                    mask = _seed_mask(seed, x2, p)
                    if need_a:
                        d_as[i] = g.t() @ _keep(x2, mask, p)
                    if need_x:
                        dx += _keep(g @ A, mask, p)
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        dx = dx.reshape(x.shape) if need_x else None
        return (dx, db, None, None, None, *d_as, *d_bs)


def lora_linear(x, weight, lora_A, lora_B, *, scaling, bias=None, dropout_p=0.0):
    """x (..., in) -> (..., out); see the module docstring. `weight` is dense (out, in) or an NF4Weight and is
    never differentiated (frozen base). Several adapters (PEFT's active adapters, summed): lora_A and lora_B
    sequences, scaling and dropout_p a number or one per adapter; empty sequences give the base layer alone
    (PEFT with merged or disabled adapters)."""
    op = "lora_linear"
    check_tensor(op, "x", x, min_ndim=1)
    amp = _amp.autocast_dtype(x.device.type)
    if amp is not None:  # as F.linear under autocast: x, W, b and the adapters in the autocast dtype
        with _amp.autocast_off(x.device.type):
            As, Bs, ss, ps = _as_adapters(lora_A, lora_B, scaling, dropout_p)
            return lora_linear(x.to(amp), _amp.cast(weight, amp), [A.to(amp) for A in As], [B.to(amp) for B in Bs],
                               scaling=list(ss), bias=_amp.cast(bias, amp), dropout_p=list(ps))
    As, Bs, ss, ps = _as_adapters(lora_A, lora_B, scaling, dropout_p)
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
    if x.shape[-1] != in_f:
        raise ValueError(f"{op}: shapes do not chain: x {tuple(x.shape)}, weight (out, in) = {(out_f, in_f)}")
    for i, (A, B, p) in enumerate(zip(As, Bs, ps)):
        name = "" if torch.is_tensor(lora_A) else f"[{i}]"
        check_tensor(op, f"lora_A{name}", A, ndim=2)
        check_tensor(op, f"lora_B{name}", B, ndim=2)
        if A.shape[1] != in_f or tuple(B.shape) != (out_f, A.shape[0]):
            raise ValueError(f"{op}: shapes do not chain: x {tuple(x.shape)}, weight (out, in) = {(out_f, in_f)}, "
                             f"lora_A{name} (r, in) {tuple(A.shape)}, lora_B{name} (out, r) {tuple(B.shape)}")
        if A.dtype != x.dtype or B.dtype != x.dtype:
            raise ValueError(f"{op}: x, lora_A{name} and lora_B{name} must share a dtype, got {x.dtype}, {A.dtype}, "
                             f"{B.dtype} (cast the adapter, as PEFT's autocast_adapter_dtype does)")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{op}: dropout_p{name} must be in [0, 1), got {p}")
        check_same_device(op, x=x, lora_A=A, lora_B=B)
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must have out = {out_f} entries")
    check_same_device(op, x=x, bias=bias, weight=weight.packed if _is_nf4(weight) else weight)
    return _LoRALinear.apply(x, bias, weight, tuple(map(float, ss)), tuple(map(float, ps)), *As, *Bs)
