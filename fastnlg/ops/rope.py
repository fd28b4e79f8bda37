"""Rotary position embedding with the semantics of Hugging Face's `apply_rotary_pos_emb`:

    q_embed = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

q (B, Hq, T, D), k (B, Hk, T, D) (GQA: Hk may differ), cos/sin (B, T, D) or (T, D), broadcast over heads;
HF's arguments too: unsqueeze_dim=2 for q, k laid out (B, T, H, D); position_ids to index a (max_pos, D)
cos/sin table (older Transformers' convention; ignored with per-batch cos/sin, as Transformers does now).
Partial rotary (Phi-3, GPT-NeoX, StableLM): cos/sin of width R < D rotate the first R dims of each head and
pass the rest through, as those models' apply_rotary_pos_emb. An odd R (rotate_half then splits at R // 2,
as HF's does) runs in plain torch; even R runs the fused kernels.
Backward: the transpose of the per-pair rotation (see kernels/rope.py); cos/sin are constants (HF builds
them under no_grad), and a cos/sin that requires grad is refused rather than silently not differentiated.
Backends: Triton (kernels/rope.py), C++ (csrc/cpu/rope.cpp), torch (below).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import check_same_device, check_same_dtype, check_tensor
from .._native import cast, native_dtype, ptr
from ._eager import define_op

BACKENDS = ("torch", "triton", "cpp")


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """HF's apply_rotary_pos_emb (unsqueeze_dim=1; partial rotary when cos is narrower than the head, as
    Phi-3's), computed in fp32 (fp64 for fp64)."""
    acc = native_dtype(q)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c, s = cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
    R = cos.shape[-1]

    def turn(x):
        xf = x.to(acc)
        rot, rest = xf[..., :R], xf[..., R:]
        return torch.cat((rot * c + _rotate_half(rot) * s, rest), dim=-1).to(x.dtype)

    return turn(q), turn(k)


def _rope_torch(x, cos, sin, backward):
    acc = native_dtype(x)
    c, s = cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
    xf = x.to(acc)
    h = x.shape[-1] // 2
    if not backward:
        return (xf * c + _rotate_half(xf) * s).to(x.dtype).contiguous()
    # transpose of the rotation: dx[j] = d[j] c[j] + d[j+h] s[j+h];  dx[j+h] = d[j+h] c[j+h] - d[j] s[j]
    d1, d2 = xf[..., :h], xf[..., h:]
    out = torch.cat((d1 * c[..., :h] + d2 * s[..., h:], d2 * c[..., h:] - d1 * s[..., :h]), dim=-1)
    return out.to(x.dtype).contiguous()


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _native_strided(t, acc):
    """t in the kernel dtype with a unit stride along D, other strides as they come (no copy of a transposed
    q/k or of a batch-broadcast cos/sin)."""
    return _unit_stride(cast(t, acc))


def _rope_cpp(x, cos, sin, backward):
    from fastnlg import _C

    acc = native_dtype(x)
    xn, cn, sn = _native_strided(x, acc), _native_strided(cos, acc), _native_strided(sin, acc)
    if cn.stride() != sn.stride():  # (the kernel reads both with one set of strides)
        cn, sn = cn.contiguous(), sn.contiguous()
    B, H, T, D = xn.shape
    out = torch.empty((B, H, T, D), dtype=acc, device=x.device)
    sx, sc = xn.stride(), cn.stride()
    _C.rope(ptr(xn), sx[0], sx[1], sx[2], ptr(cn), ptr(sn), sc[0], sc[1], ptr(out), B, H, T, D, backward,
            acc == torch.float64)
    return cast(out, x.dtype)


def _run_triton(q, k, cos, sin, backward):
    """q and k in one launch."""
    from fastnlg.kernels import rope as kern

    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return kern.apply(_unit_stride(q), _unit_stride(k), cos, sin, backward)


def _each(fn):
    """A backend that rotates one tensor at a time, run on q and on k."""
    return lambda q, k, cos, sin, backward: (fn(q, cos, sin, backward), fn(k, cos, sin, backward))


_RUN = {"torch": _each(_rope_torch), "cpp": _each(_rope_cpp), "triton": _run_triton}


def _run(q, k, cos, sin, backward):
    """cos/sin already (B, T, D) (possibly expanded views)."""
    return _RUN[_backend.choose("apply_rope", q, BACKENDS)](q, k, cos, sin, backward)


def _rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(q, k, cos, sin, False)


def _rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(dq, dk, cos, sin, True)


def _contiguous_like(t):
    """Every backend returns contiguous outputs, whatever the input strides (HF's q/k are transposed views)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _rope_fwd_fake(q, k, cos, sin):
    return _contiguous_like(q), _contiguous_like(k)


def _rope_bwd_fake(dq, dk, cos, sin):
    return _contiguous_like(dq), _contiguous_like(dk)


def _setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _ROPE.backward(_unit_stride(dq), _unit_stride(dk), cos, sin)
    return dq, dk, None, None


_ROPE = define_op("rope", _rope_fwd, _rope_fwd_fake, _rope_bwd, _rope_bwd_fake, _setup, _backward)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids=None,
               unsqueeze_dim: int = 1):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) by cos/sin (B, T, R) or (T, R), R <= D; returns (q, k).
    See the module docstring for position_ids, unsqueeze_dim and partial rotary."""
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
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"{op}: unsqueeze_dim must be 1 (q, k as (B, H, T, D)) or 2 ((B, T, H, D)), got {unsqueeze_dim}")
    if unsqueeze_dim == 2:  # (B, T, H, D) -> (B, H, T, D) views; the kernels take any strides but D's
        q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, position_ids)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"{op}: k must be (B, Hk, T, D) matching q (B, Hq, T, D) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if position_ids is not None and cos.dim() == 2:
        if tuple(position_ids.shape) not in ((T,), (B, T), (1, T)):
            raise ValueError(f"{op}: position_ids must be (T,) or (B, T) with B={B}, T={T}, got "
                             f"{tuple(position_ids.shape)}")
        cos, sin = cos[position_ids], sin[position_ids]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    R = cos.shape[-1] if cos.dim() == 3 else -1
    if cos.dim() != 3 or cos.shape[1] != T or not 0 < R <= D or cos.shape[0] not in (1, B):
        raise ValueError(f"{op}: cos/sin must be (B, T, R) or (T, R) with B={B}, T={T}, R <= D={D}, got "
                         f"{tuple(cos.shape)}")
    cos, sin = cos.expand(B, T, R), sin.expand(B, T, R)
    if R < D:  # partial rotary: the first R dims of each head turn, the rest pass through
        q_rot, k_rot = apply_rope(q[..., :R], k[..., :R], cos, sin)
        return torch.cat((q_rot, q[..., R:]), dim=-1), torch.cat((k_rot, k[..., R:]), dim=-1)
    if D % 2:  # HF's rotate_half on an odd width: the plain-torch spec, differentiated by autograd
        return apply_rope_reference(q, k, cos, sin)
    return _ROPE.forward(q, k, cos, sin)
