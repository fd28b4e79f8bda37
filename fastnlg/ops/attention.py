"""Fused attention (FlashAttention-2 algorithm): forward and backward without any (T, S) tensor.

Semantics (the spec is `attention_reference` below; kernels in kernels/attention.py, flash-decoding in
kernels/attention_decode.py):
    q (B, Hq, T, D), k/v (B, Hkv, S, D), Hq % Hkv == 0 (query head h reads kv head h // (Hq / Hkv));
    query i sits at key position p_i = i + S - T (bottom-right alignment, as with a KV cache);
    s_ij = scale * q_i . k_j,  then softcap: s = c tanh(s / c);
    key j is visible to query i iff  (not causal or j <= p_i)  and  (left < 0 or j >= p_i - left)
                                     and (right < 0 or j <= p_i + right)  and key_padding_mask[b, j];
    with cu_seqlens (B = 1) the rows are packed sequences [cu[n], cu[n+1]) that only see themselves,
    each with its own bottom-right alignment (T_n = S_n for self-attention);
    P = softmax over visible keys (a row that sees no key outputs 0);
    O = dropout(P) V, dropout keeping each P_ij with probability 1 - p and scaling by 1 / (1 - p).

Backward (FA2; derived and gradchecked here in fp64, tests/ops/test_attention.py), with lse_i the row
log-sum-exp, Pd = dropout(P), Z the keep mask / (1 - p):
    dV = Pd^T dO;  dPd = dO V^T;  dP = dPd * Z;  Delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i;
    dS = P * (dP - Delta) (* (1 - tanh^2(s_raw / c)) with softcap);  dQ = scale dS K;  dK = scale dS^T Q.
GQA: dK/dV of a kv head sum over the query heads that share it (the kernel loops over them; no expand).
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import backend as _backend
from .._checks import check_same_device, check_same_dtype, check_tensor
from .._native import native_dtype
from . import _amp

BACKENDS = ("torch", "triton")
MAX_HEAD_DIM = 256


def _window(window):
    if window is None:
        return -1, -1
    left, right = window
    left = -1 if left is None or left < 0 else int(left)
    right = -1 if right is None or right < 0 else int(right)
    return left, right


def visible_mask(T, S, *, causal, window, device, key_padding_mask=None, cu_seqlens=None):
    """Bool (B or 1, 1, T, S): True where query i may attend key j (the spec above)."""
    left, right = _window(window)
    if cu_seqlens is None:
        i = torch.arange(T, device=device)[:, None] + (S - T)
        j = torch.arange(S, device=device)[None, :]
        same = torch.ones(T, S, dtype=torch.bool, device=device)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        rows = torch.arange(T, device=device)  # packed self-attention: T == S, keys are the same rows
        seq = torch.bucketize(rows, cu[1:], right=True)  # the sequence each row belongs to
        local = rows - cu[seq]  # position inside its sequence (T_n == S_n: no offset)
        i, j = local[:, None], local[None, :]
        same = seq[:, None] == seq[None, :]
    ok = same.clone()
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    ok = ok[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :].to(torch.bool)
    return ok


def attention_reference(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, window=None, softcap=None,
                        key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_mask=None):
    """The spec in plain torch (materialises (T, S); fp32 math, fp64 for fp64 inputs). `dropout_mask`
    (B, Hq, T, S) bool is the keep mask to use when dropout_p > 0 (tests pass the kernel's)."""
    ok = visible_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device,
                      key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    return masked_attention_reference(q, k, v, ok, softmax_scale=softmax_scale, softcap=softcap,
                                      dropout_p=dropout_p, dropout_mask=dropout_mask)


def masked_attention_reference(q, k, v, allowed, *, softmax_scale=None, softcap=None, dropout_p=0.0,
                               dropout_mask=None):
    """Attention under any bool mask `allowed` (broadcastable to (B, Hq, T, S), True = attend): the spec's
    arithmetic for a given mask. A row with no allowed key outputs 0."""
    Hq, D = q.shape[1], q.shape[3]
    acc = native_dtype(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    rep = Hq // k.shape[1]
    kk = k.to(acc).repeat_interleave(rep, dim=1)
    vv = v.to(acc).repeat_interleave(rep, dim=1)
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, -float("inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    p = p / torch.where(l > 0, l, torch.ones_like(l))
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1 - dropout_p)
    return torch.matmul(p, vv).to(q.dtype)


def attention_backward_reference(do, q, k, v, *, causal=True, softmax_scale=None, window=None, softcap=None,
                                 key_padding_mask=None, cu_seqlens=None, dropout_mask=None, dropout_p=0.0):
    """The FA2 backward formulas of the module docstring in plain torch (what the kernels implement),
    checked against autograd of attention_reference in fp64. -> (dq, dk, dv)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    raw = torch.matmul(q, kk.transpose(-1, -2)) * scale
    z = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
    ok = visible_mask(T, S, causal=causal, window=window, device=q.device, key_padding_mask=key_padding_mask,
                      cu_seqlens=cu_seqlens)
    z = z.masked_fill(~ok, -float("inf"))
    lse = torch.logsumexp(z, -1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # empty rows: P = 0
    p = torch.exp(z - lse)
    zmask = dropout_mask.to(p.dtype) / (1 - dropout_p) if dropout_p > 0 else torch.ones_like(p)
    o = torch.matmul(p * zmask, vv)
    dv = torch.matmul((p * zmask).transpose(-1, -2), do)
    dp = torch.matmul(do, vv.transpose(-1, -2)) * zmask
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1 - (z.masked_fill(~ok, 0.0) / softcap) ** 2)
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    fold = (lambda t: t.reshape(B, Hkv, rep, S, D).sum(2))  # GQA: sum over the query heads sharing a kv head
    return dq, fold(dk), fold(dv)


def _check(q, k, v, causal, softmax_scale, dropout_p, window, softcap, key_padding_mask, cu_seqlens, max_seqlen):
    op = "flash_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=4, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    check_same_dtype(op, q=q, k=k, v=v)
    check_same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape (B, Hkv, S, D)")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{op}: q (B, Hq, T, D) = {tuple(q.shape)} and k (B, Hkv, S, D) = {tuple(k.shape)} must share "
                         "B and the head dim D")
    if Hq % k.shape[1]:
        raise ValueError(f"{op}: query heads Hq={Hq} must be a multiple of kv heads Hkv={k.shape[1]}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D={D} is above the supported {MAX_HEAD_DIM}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"{op}: softmax_scale must be > 0 or None, got {softmax_scale}")
    if window is not None and (not isinstance(window, (tuple, list)) or len(window) != 2):
        raise ValueError(f"{op}: window must be (left, right) with None or -1 for unbounded, got {window!r}")
    S = k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"{op}: key_padding_mask must be bool (B, S) = ({B}, {S}), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if cu_seqlens is not None:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must be int32 (n + 1,), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if B != 1 or T != S:
            raise ValueError(f"{op}: with cu_seqlens q and k are packed: B must be 1 and T == S, got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
        if key_padding_mask is not None:
            raise ValueError(f"{op}: cu_seqlens and key_padding_mask are two ways to say the same; pass one")
        if max_seqlen is not None and cu_seqlens.is_cuda:
            return max_seqlen  # as flash-attn's varlen API: with max_seqlen the caller vouches for cu_seqlens
            # (no host read, so no GPU sync in the training step); without it, one read checks and measures
        cu = cu_seqlens.tolist()  # one host read, also gives max_seqlen
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        if cu[0] != 0 or cu[-1] != T or min(lengths) < 0:
            raise ValueError(f"{op}: cu_seqlens must start at 0, not decrease and end at the packed length {T}; got "
                             f"{cu if len(cu) <= 12 else cu[:6] + ['...'] + cu[-6:]}")
        longest = max(lengths)
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"{op}: max_seqlen={max_seqlen} is below the longest packed sequence ({longest})")
        return longest
    return None


def _sdpa(q, k, v, causal, scale, dropout_p, window, key_padding_mask, cu_seqlens):
    """The torch backend (CPU default): PyTorch SDPA with the spec's mask. Rows that see no key get an
    all-true mask row (no NaN in forward or backward) and a zeroed output, as the spec says."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    plain = window is None and key_padding_mask is None and cu_seqlens is None and (not causal or T == S)
    if plain:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                                                scale=scale, enable_gqa=gqa)
    ok = visible_mask(T, S, causal=causal, window=window, device=q.device, key_padding_mask=key_padding_mask,
                      cu_seqlens=cu_seqlens)  # (B or 1, 1, T, S)
    empty = ~ok.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ok | empty, dropout_p=dropout_p,
                                                           scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, dropout_p, window, softcap, kpm, cu_seqlens, max_seqlen):
        from fastnlg.kernels import attention as kern

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        kpm_u8 = None if kpm is None else kpm.to(torch.uint8).contiguous()
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
        kw = dict(causal=causal, scale=scale, softcap=softcap, window=window, key_padding_mask=kpm_u8,
                  cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed)
        o, lse = kern.forward(q, k, v, **kw)
        ctx.save_for_backward(q, k, v, o, lse, kpm_u8, cu_seqlens)
        ctx.kw = kw
        return o

    @staticmethod
    def backward(ctx, do):
        from fastnlg.kernels import attention as kern

        q, k, v, o, lse, kpm_u8, cu_seqlens = ctx.saved_tensors
        kw = dict(ctx.kw, key_padding_mask=kpm_u8, cu_seqlens=cu_seqlens)
        dq, dk, dv = kern.backward(do.contiguous(), q, k, v, o, lse, **kw)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attention(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, window=None, softcap=None,
                    key_padding_mask=None, cu_seqlens=None, max_seqlen=None, decode=None):
    """Attention of q (B, Hq, T, D) over k, v (B, Hkv, S, D) -> (B, Hq, T, D); see the module docstring.
    CUDA tensors run the Triton kernels; CPU tensors the torch reference (Triton under TRITON_INTERPRET=1).
    Under autocast q, k, v are cast to the autocast dtype, as SDPA does. With cu_seqlens, max_seqlen (the
    longest packed sequence) spares the host read that checks cu_seqlens: on CUDA the caller then vouches
    for it, as with flash-attn's varlen API, and the call never waits for the GPU.

    decode picks the Triton kernel: flash-decoding (keys split over programs, forward only) or the
    FlashAttention-2 kernel. None (default) takes flash-decoding exactly when no gradient is needed (grad
    mode off, or no input requires grad) and the call is decode-shaped: no dropout, no cu_seqlens, at most
    kernels.attention_decode.DECODE_MAX_ROWS query rows per kv head, and S >= 4 T (a KV cache). True insists on it
    (an error when a gradient is needed or the shapes are not decode-shaped); False never takes it."""
    amp = _amp.autocast_dtype(q.device.type)
    if amp is not None:
        with _amp.autocast_off(q.device.type):
            return flash_attention(q.to(amp), k.to(amp), v.to(amp), causal=causal, softmax_scale=softmax_scale,
                                   dropout_p=dropout_p, window=window, softcap=softcap,
                                   key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                   decode=decode)
    longest = _check(q, k, v, causal, softmax_scale, dropout_p, window, softcap, key_padding_mask, cu_seqlens,
                     max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _RUN[_backend.choose("flash_attention", q, BACKENDS)](
        q, k, v, causal=bool(causal), scale=scale, dropout_p=float(dropout_p), window=window,
        softcap=None if softcap is None else float(softcap), key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen or longest, decode=decode)


def _run_torch(q, k, v, *, causal, scale, dropout_p, window, softcap, key_padding_mask, cu_seqlens, max_seqlen,
               decode):
    """SDPA under the spec's mask; the spec itself where SDPA cannot (softcap) or for fp64 (decode does not
    apply: there is one torch path)."""
    if softcap is not None or q.dtype == torch.float64:
        return attention_reference(q, k, v, causal=causal, softmax_scale=scale, dropout_p=dropout_p, window=window,
                                   softcap=softcap, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    return _sdpa(q, k, v, causal, scale, dropout_p, window, key_padding_mask, cu_seqlens)


def _run_triton(q, k, v, *, causal, scale, dropout_p, window, softcap, key_padding_mask, cu_seqlens, max_seqlen,
                decode):
    """Flash-decoding or the FlashAttention-2 kernels, by the rule in flash_attention's docstring."""
    from fastnlg.kernels import attention_decode as kern

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    eligible = kern.decode_eligible(q, k, dropout_p, cu_seqlens)
    if decode and (needs_grad or not eligible):
        raise ValueError("flash_attention: decode=True needs no gradient and a decode-shaped call (no dropout, no "
                         f"cu_seqlens, <= {kern.DECODE_MAX_ROWS} query rows per kv head, S >= 4 T); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, gradient needed: {needs_grad}")
    from fastnlg.kernels import attention as fa2

    why = fa2.unsupported(q.dtype, q.shape[-1], q.device, needs_grad) if q.is_cuda else None
    if why is not None:  # no clean tile config on this GPU (kernels/_arch.py): SDPA runs it, said once
        _warn_once(f"flash_attention: {why}; the torch backend (SDPA) runs this call")
        return _run_torch(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, window=window, softcap=softcap,
                          key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                          decode=decode)
    if decode is not False and not needs_grad and eligible:  # flash-decoding (KV cache)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        kpm = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
        return kern.decode(q, k, v, causal=causal, scale=scale, softcap=softcap, window=_window(window),
                           key_padding_mask=kpm)
    return _FlashAttention.apply(q, k, v, causal, scale, dropout_p, _window(window), softcap, key_padding_mask,
                                 cu_seqlens, max_seqlen)


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


_RUN = {"torch": _run_torch, "triton": _run_triton}
