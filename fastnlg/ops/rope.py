"""Rotary position embedding with the semantics of Hugging Face's `apply_rotary_pos_emb`:

    q_embed = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

q (B, Hq, T, D), k (B, Hk, T, D) (GQA: Hk may differ), cos/sin (B, T, D) or (T, D), broadcast over heads.
Backward: the transpose of the per-pair rotation (see kernels/rope.py); cos/sin are constants (HF builds
them under no_grad), and a cos/sin that requires grad is refused rather than silently not differentiated.
Backends: Triton (kernels/rope.py), C++ (csrc/cpu/rope.cpp), torch (below).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ._checks import check_same_device, check_same_dtype, check_tensor
from ._dispatch import native_dtype, ptr, to_native

BACKENDS = ("torch", "triton", "cpp")


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """HF's apply_rotary_pos_emb (unsqueeze_dim=1), computed in fp32 (fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c, s = cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
    qf, kf = q.to(acc), k.to(acc)
    return (qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype)


def _rope_torch(x, cos, sin, backward):
    acc = native_dtype(x)
    c, s = cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
    xf = x.to(acc)
    h = x.shape[-1] // 2
    if not backward:
        return (xf * c + _rotate_half(xf) * s).to(x.dtype)
    # transpose of the rotation: dx[j] = d[j] c[j] + d[j+h] s[j+h];  dx[j+h] = d[j+h] c[j+h] - d[j] s[j]
    d1, d2 = xf[..., :h], xf[..., h:]
    out = torch.cat((d1 * c[..., :h] + d2 * s[..., h:], d2 * c[..., h:] - d1 * s[..., :h]), dim=-1)
    return out.to(x.dtype)


def _rope_cpp(x, cos, sin, backward):
    from fastnlg import _C

    acc = native_dtype(x)
    xn, cn, sn = to_native(x, acc), to_native(cos, acc), to_native(sin, acc)
    out = torch.empty_like(xn)
    B, H, T, D = xn.shape
    _C.rope(ptr(xn), ptr(cn), ptr(sn), ptr(out), B, H, T, D, backward, acc == torch.float64)
    return out.to(x.dtype)


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _run(q, k, cos, sin, backward):
    """cos/sin already (B, T, D) (possibly expanded views)."""
    backend = _backend.choose("apply_rope", q, BACKENDS)
    if backend == "triton":
        from fastnlg.kernels import rope as kern

        if cos.stride(-1) != 1 or cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        return kern.apply(_unit_stride(q), _unit_stride(k), cos, sin, backward)
    fn = _rope_cpp if backend == "cpp" else _rope_torch
    return fn(q, cos, sin, backward), fn(k, cos, sin, backward)


@torch.library.custom_op("fastnlg::rope_fwd", mutates_args=())
def _rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(q, k, cos, sin, False)


@torch.library.custom_op("fastnlg::rope_bwd", mutates_args=())
def _rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(dq, dk, cos, sin, True)


@_rope_fwd.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


@_rope_bwd.register_fake
def _(dq, dk, cos, sin):
    return torch.empty_like(dq), torch.empty_like(dk)


def _setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.fastnlg.rope_bwd(_unit_stride(dq), _unit_stride(dk), cos, sin)
    return dq, dk, None, None


_rope_fwd.register_autograd(_backward, setup_context=_setup)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) by cos/sin (B, T, D) or (T, D); returns (q, k)."""
    op = "apply_rope"
    for name, t in (("q", q), ("k", k)):
        check_tensor(op, name, t, ndim=4)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, t)
        if t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad; apply_rope treats cos/sin as constants "
                             "(compute them under torch.no_grad(), as Hugging Face does)")
    check_same_dtype(op, q=q, k=k)
    check_same_device(op, q=q, k=k, cos=cos, sin=sin)
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"{op}: k must be (B, Hk, T, D) matching q (B, Hq, T, D) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"{op}: head dim D must be even, got q {tuple(q.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.dim() != 3 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"{op}: cos/sin must be (B, T, D) or (T, D) with B={B}, T={T}, D={D}, got {tuple(cos.shape)}")
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
    return torch.ops.fastnlg.rope_fwd(q, k, cos, sin)
