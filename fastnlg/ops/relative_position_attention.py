"""T5's relative-position-bias attention without its (H, T, S) bias tensor: relative_position_attention.

Semantics (the spec is `relative_position_attention_reference` below):
    q (B, H, T, D), k/v (B, Hkv, S, D) with H % Hkv == 0 (as flash_attention); bias_table (num_buckets, H),
    T5's relative_attention_bias.weight;
    query i sits at position p_i = i + query_offset (query_offset: the cached length when decoding);
    bucket_ij = T5's _relative_position_bucket(j - p_i, bidirectional, num_buckets, max_distance);
    s_ij = softmax_scale * q_i . k_j + bias_table[bucket_ij, h]   (T5 does not scale: softmax_scale = 1);
    key j is visible to query i iff (not causal or j <= p_i) and key_padding_mask[b, j];
    P = softmax over the visible keys (a row that sees none outputs 0); O = dropout(P) V.
Backward: flash_attention's formulas (ops/attention.py) with dS = P (dP - Delta) the scores' gradient, and
    d bias_table[n, h] = sum of dS[b, h, i, j] over b and the (i, j) with bucket_ij = n.
bucket_ij depends on j - p_i only, and is constant for j - p_i >= max_distance and for j - p_i <=
-max_distance, so the kernels look it up in a table over j - p_i clamped to [-max_distance, max_distance]
(`bucket_lut`: Transformers' formula, same fp32 log, run on the call's device), and the bias through it.

Backends:
- torch (the CPU default): a problem of one block (T5 at training lengths) runs as one autograd graph
  (`_composite`: it keeps P instead of recomputing the scores in backward); a larger one, in blocks of query
  rows. Per block: the bias from the lookup, the scores, the softmax, P V; the backward recomputes each block
  from the saved log-sum-exp and adds the block's dS into the table's gradient by bucket. The peak is one
  block's scores (about 16 MB), not eager T5's (B, H, T, S) scores, probabilities and bias.
- triton: the FlashAttention-2 kernels (kernels/attention.py, HAS_RELPOS): the bias is read per (i, j) of
  each tile; the dQ kernel sums each tile's dS by bucket into one partial row per program, and the rows are
  summed here: no float atomics, deterministic.
"""
from __future__ import annotations

import math

import torch

from .. import backend as _backend
from .._checks import check_same_device, check_same_dtype, check_tensor
from .._native import cast, native_dtype
from . import _amp
from ._eager import define_op
from .attention import MAX_HEAD_DIM, _warn_once

BACKENDS = ("torch", "triton")
_OP = "relative_position_attention"
_BLOCK_SCORES = 1 << 22  # scores per block of the torch backend (16 MB in fp32)
_COMPOSITE_SCORES = 1 << 22  # up to this many scores the torch backend runs as one autograd graph (_composite)


def relative_position_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
    """Transformers' T5Attention._relative_position_bucket: the same ops in the same order (so the same fp32
    log and the same bucket at every boundary). int64 (any shape) -> int64 buckets in [0, num_buckets)."""
    rel = relative_position
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).to(torch.long) * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


def bucket_lut(*, bidirectional, num_buckets, max_distance, device):
    """int64 (2 L + 1,): the bucket of relative position r = j - p_i at index clamp(r, -L, L) + L, with
    L = max_distance (the bucket is constant beyond it on both sides)."""
    rel = torch.arange(-max_distance, max_distance + 1, device=device)
    return relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                    max_distance=max_distance)


def relative_position_bias(bias_table, T, S, *, bidirectional, num_buckets, max_distance, query_offset=0):
    """(1, H, T, S) bias in the table's dtype, as T5Attention.compute_bias(T, S, past_seen_tokens=query_offset)."""
    device = bias_table.device
    rel = torch.arange(S, device=device)[None, :] - (torch.arange(T, device=device)[:, None] + query_offset)
    bucket = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                      max_distance=max_distance)
    return bias_table[bucket].permute(2, 0, 1).unsqueeze(0)


def relative_position_attention_reference(q, k, v, bias_table, *, bidirectional, num_buckets, max_distance,
                                          causal=False, key_padding_mask=None, softmax_scale=1.0, query_offset=0):
    """The spec in plain torch (materialises (B, H, T, S); fp32 math, fp64 for fp64 inputs)."""
    T, S = q.shape[2], k.shape[2]
    acc = native_dtype(q)
    rep = q.shape[1] // k.shape[1]
    bias = relative_position_bias(bias_table.to(acc), T, S, bidirectional=bidirectional, num_buckets=num_buckets,
                                  max_distance=max_distance, query_offset=query_offset)
    s = torch.matmul(q.to(acc), k.to(acc).repeat_interleave(rep, 1).transpose(-1, -2)) * softmax_scale + bias
    ok = _visible(T, S, causal, query_offset, q.device, key_padding_mask)
    s = s.masked_fill(~ok, -float("inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    return torch.matmul(p, v.to(acc).repeat_interleave(rep, 1)).to(q.dtype)


def _visible(T, S, causal, query_offset, device, key_padding_mask, r0=0, r1=None):
    """Bool (B or 1, 1, rows, S) of query rows r0 .. r1 - 1: the spec's visibility."""
    r1 = T if r1 is None else r1
    i = torch.arange(r0, r1, device=device)[:, None] + query_offset
    j = torch.arange(S, device=device)[None, :]
    ok = (j <= i) if causal else torch.ones(r1 - r0, S, dtype=torch.bool, device=device)
    ok = ok[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :].to(torch.bool)
    return ok


# ---- the torch backend: blocks of query rows ----------------------------------------------------------------

def _block_rows(B, H, T, S):
    return max(1, min(T, _BLOCK_SCORES // max(1, B * H * S)))


def _block(q, kk, rb, kpm, causal, scale, query_offset, L, r0, r1):
    """Masked scores (B, H, r1 - r0, S) of query rows r0 .. r1 - 1 and the lookup index of their (i, j)."""
    S = kk.shape[2]
    rel = torch.arange(S, device=q.device)[None, :] - (torch.arange(r0, r1, device=q.device)[:, None] + query_offset)
    idx = rel.clamp(-L, L) + L  # (rows, S)
    s = torch.matmul(q[:, :, r0:r1].to(kk.dtype), kk.transpose(-1, -2)) * scale + rb[:, idx]
    ok = _visible(q.shape[2], S, causal, query_offset, q.device, kpm, r0, r1)
    return s.masked_fill(~ok, -float("inf")), idx


def _keep(shape, seed, block, p, dtype, device):
    """The dropout keep mask / (1 - p) of one block (the same numbers in forward and backward)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) * 1000003 + block)
    return (torch.rand(shape, generator=g, device=device, dtype=dtype) >= p).to(dtype) / (1.0 - p)


def _expand_kv(t, rep, acc):
    t = t.to(acc)
    return t.repeat_interleave(rep, 1) if rep > 1 else t


def _lookup(table, acc, bidirectional, num_buckets, max_distance):
    """(per-head bias over the clamped relative positions (H, 2 L + 1) in acc, the bucket lookup (2 L + 1,))."""
    lut = bucket_lut(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance,
                     device=table.device)
    return table.to(acc)[lut].t().contiguous(), lut


def _torch_fwd(q, k, v, table, kpm, causal, scale, bidirectional, num_buckets, max_distance, query_offset,
               dropout_p, seed):
    B, H, T, _ = q.shape
    S = k.shape[2]
    acc = native_dtype(q)
    rep = H // k.shape[1]
    kk, vv = _expand_kv(k, rep, acc), _expand_kv(v, rep, acc)
    rb, _ = _lookup(table, acc, bidirectional, num_buckets, max_distance)
    o = torch.empty_like(q)  # (q's layout, as the kernels' and the fakes')
    lse = torch.empty(B, H, T, dtype=acc, device=q.device)
    rows = _block_rows(B, H, T, S)
    for n, r0 in enumerate(range(0, T, rows)):
        r1 = min(T, r0 + rows)
        s, _ = _block(q, kk, rb, kpm, causal, scale, query_offset, max_distance, r0, r1)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        empty = l == 0
        lse[:, :, r0:r1] = torch.where(empty, float("inf"), m + torch.log(torch.where(empty, 1.0, l))).squeeze(-1)
        p = p / torch.where(empty, 1.0, l)
        if dropout_p > 0:
            p = p * _keep(p.shape, seed, n, dropout_p, acc, q.device)
        o[:, :, r0:r1] = torch.matmul(p, vv).to(q.dtype)
    return o, lse


def _composite(q, k, v, table, kpm, causal, scale, bidirectional, num_buckets, max_distance, query_offset,
               dropout_p):
    """The torch backend on a problem of one block (T5 at training lengths on CPU) as one autograd graph, as
    eager T5 computes it: the (H, T, S) bias once (an embedding of the buckets: the table's gradient is the
    embedding's), the masks added to it, scores + bias, softmax, P V; autograd keeps P for the backward
    instead of recomputing the scores. Rows that see no key output 0. The memory is one block's."""
    acc = native_dtype(q)
    T, S = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    kk, vv = _expand_kv(k, rep, acc), _expand_kv(v, rep, acc)
    L = max_distance
    lut = bucket_lut(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=L, device=q.device)
    rel = torch.arange(S, device=q.device)[None, :] - (torch.arange(T, device=q.device)[:, None] + query_offset)
    bias = torch.nn.functional.embedding(lut[rel.clamp(-L, L) + L], table.to(acc)).permute(2, 0, 1)  # (H, T, S)
    if causal:
        bias = bias.masked_fill(rel > 0, -float("inf"))
    if kpm is not None:
        pad = torch.zeros(kpm.shape, dtype=acc, device=q.device).masked_fill(~kpm.to(torch.bool), torch.finfo(acc).min)
        bias = bias + pad[:, None, None, :]
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2))
    s = (s if scale == 1.0 else s * scale) + bias
    p = torch.softmax(s, -1)
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    o = torch.matmul(p, vv)
    if kpm is not None:  # (a padded key adds the dtype's minimum: a row whose keys are all padding is uniform)
        empty = ~_visible(T, S, causal, query_offset, q.device, kpm).any(-1, keepdim=True)
        o = o.masked_fill(empty, 0.0)
    return o.to(q.dtype)


def _torch_bwd(do, q, k, v, o, lse, table, kpm, causal, scale, bidirectional, num_buckets, max_distance,
               query_offset, dropout_p, seed):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = native_dtype(q)
    rep = H // Hkv
    kk, vv = _expand_kv(k, rep, acc), _expand_kv(v, rep, acc)
    rb, lut = _lookup(table, acc, bidirectional, num_buckets, max_distance)
    dq = torch.empty_like(q, dtype=acc)
    dk = torch.zeros(B, H, S, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, H, S, D, dtype=acc, device=q.device)
    drb = torch.zeros(H, 2 * max_distance + 1, dtype=acc, device=q.device)
    rows = _block_rows(B, H, T, S)
    for n, r0 in enumerate(range(0, T, rows)):
        r1 = min(T, r0 + rows)
        s, idx = _block(q, kk, rb, kpm, causal, scale, query_offset, max_distance, r0, r1)
        p = torch.exp(s - lse[:, :, r0:r1, None].to(acc))  # 0 where invisible and on rows that see no key
        d_o = do[:, :, r0:r1].to(acc)
        dp = torch.matmul(d_o, vv.transpose(-1, -2))
        pd = p
        if dropout_p > 0:
            z = _keep(p.shape, seed, n, dropout_p, acc, q.device)
            pd, dp = p * z, dp * z
        dv += torch.matmul(pd.transpose(-1, -2), d_o)
        delta = (d_o * o[:, :, r0:r1].to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        qb = q[:, :, r0:r1].to(acc)
        dq[:, :, r0:r1] = torch.matmul(ds, kk) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qb) * scale
        drb.index_add_(1, idx.reshape(-1), ds.sum(0).reshape(H, -1))
    dtable = torch.zeros(num_buckets, H, dtype=acc, device=q.device).index_add_(0, lut, drb.t())
    if rep > 1:
        dk, dv = dk.reshape(B, Hkv, rep, S, D).sum(2), dv.reshape(B, Hkv, rep, S, D).sum(2)
    # the gradients in the inputs' layouts (as the kernels give them, and the fakes say)
    return dq.to(q.dtype), torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv), dtable


# ---- the Triton backend --------------------------------------------------------------------------------------

def _relpos_args(table, bidirectional, num_buckets, max_distance, query_offset):
    rb, lut = _lookup(table, torch.float32, bidirectional, num_buckets, max_distance)
    return dict(bias_lut=rb, bucket_lut=lut.to(torch.int32), max_distance=int(max_distance),
                num_buckets=int(num_buckets), query_offset=int(query_offset))


def _triton_fwd(q, k, v, table, kpm, causal, scale, bidirectional, num_buckets, max_distance, query_offset,
                dropout_p, seed):
    from fastnlg.kernels import attention as kern

    o, lse = kern.forward(*_contiguous(q, k, v), causal=causal, scale=scale, softcap=None, window=(-1, -1),
                          key_padding_mask=_kpm_u8(kpm), cu_seqlens=None, max_seqlen=None, dropout_p=dropout_p,
                          seed=seed, relpos=_relpos_args(table, bidirectional, num_buckets, max_distance,
                                                         query_offset))
    return o, lse


def _triton_bwd(do, q, k, v, o, lse, table, kpm, causal, scale, bidirectional, num_buckets, max_distance,
                query_offset, dropout_p, seed):
    from fastnlg.kernels import attention as kern

    rp = _relpos_args(table, bidirectional, num_buckets, max_distance, query_offset)
    dq, dk, dv, dtable = kern.backward(do.contiguous(), *_contiguous(q, k, v), o, lse, causal=causal, scale=scale,
                                       softcap=None, window=(-1, -1), key_padding_mask=_kpm_u8(kpm),
                                       cu_seqlens=None, max_seqlen=None, dropout_p=dropout_p, seed=seed, relpos=rp)
    return dq, dk, dv, dtable


def _contiguous(*ts):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _kpm_u8(kpm):
    return None if kpm is None else kpm.to(torch.uint8).contiguous()


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd}


def _backend_for(q):
    """The chosen backend; the torch one where the kernels have no clean tile config for this GPU (kernels/
    _arch.py), said once. Decided with the backward's kernels too, so that forward and backward agree."""
    name = _backend.choose(_OP, q, BACKENDS)
    if name == "triton" and q.is_cuda:
        from fastnlg.kernels import attention as kern

        why = kern.unsupported(q.dtype, q.shape[-1], q.device, backward=True, relpos=True)
        if why is not None:
            _warn_once(f"{_OP}: {why}; its torch backend runs this call")
            return "torch"
    return name


# ---- the op ---------------------------------------------------------------------------------------------------

def _rpa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, kpm: torch.Tensor | None,
             causal: bool, scale: float, bidirectional: bool, num_buckets: int, max_distance: int,
             query_offset: int, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _FWD[_backend_for(q)](q, k, v, table, kpm, causal, scale, bidirectional, num_buckets, max_distance,
                                 query_offset, dropout_p, seed)


def _rpa_fwd_fake(q, k, v, table, kpm, causal, scale, bidirectional, num_buckets, max_distance, query_offset,
                  dropout_p, seed):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


def _rpa_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, table: torch.Tensor, kpm: torch.Tensor | None, causal: bool, scale: float,
             bidirectional: bool, num_buckets: int, max_distance: int, query_offset: int, dropout_p: float,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dtable = _BWD[_backend_for(q)](do, q, k, v, o, lse, table, kpm, causal, scale, bidirectional,
                                               num_buckets, max_distance, query_offset, dropout_p, seed)
    return dq, dk, dv, cast(dtable, table.dtype)


def _rpa_bwd_fake(do, q, k, v, o, lse, table, kpm, causal, scale, bidirectional, num_buckets, max_distance,
                  query_offset, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), table.new_empty(table.shape)


def _setup(ctx, inputs, output):
    q, k, v, table, kpm, *scalars = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], table, kpm)
    ctx.scalars = scalars
    ctx.set_materialize_grads(False)


def _gradients(ctx, do, _dlse):
    q, k, v, o, lse, table, kpm = ctx.saved_tensors
    if do is None:
        return (None,) * 13
    dq, dk, dv, dtable = _RPA.backward(do.contiguous(), q, k, v, o, lse, table, kpm, *ctx.scalars)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dtable if need[3] else None) + (None,) * 9


_RPA = define_op(_OP, _rpa_fwd, _rpa_fwd_fake, _rpa_bwd, _rpa_bwd_fake, _setup, _gradients)


def _check(q, k, v, bias_table, bidirectional, num_buckets, max_distance, causal, key_padding_mask,
           softmax_scale, query_offset, dropout_p):
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, ndim=4, dtypes=dtypes)
    check_tensor(_OP, "bias_table", bias_table, ndim=2, dtypes=dtypes)
    check_same_dtype(_OP, q=q, k=k, v=v)
    check_same_device(_OP, q=q, k=k, v=v, bias_table=bias_table, key_padding_mask=key_padding_mask)
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"{_OP}: q (B, H, T, D) = {tuple(q.shape)} and k, v (B, Hkv, S, D) = {tuple(k.shape)}, "
                         f"{tuple(v.shape)} must share B and D, k and v one shape, and H a multiple of Hkv")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim D={D} is above the supported {MAX_HEAD_DIM}")
    if tuple(bias_table.shape) != (num_buckets, H):
        raise ValueError(f"{_OP}: bias_table must be (num_buckets, H) = ({num_buckets}, {H}) (T5's "
                         f"relative_attention_bias.weight), got {tuple(bias_table.shape)}")
    half = num_buckets // 2 if bidirectional else num_buckets
    if half < 2 or max_distance <= half // 2:
        raise ValueError(f"{_OP}: num_buckets={num_buckets} (bidirectional={bidirectional}) and max_distance="
                         f"{max_distance} leave no logarithmic buckets: need {'2 x ' if bidirectional else ''}"
                         f"at least 2 buckets per direction and max_distance > {half // 2}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, k.shape[2])):
        raise ValueError(f"{_OP}: key_padding_mask must be bool (B, S) = ({B}, {k.shape[2]}), got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if not softmax_scale > 0:
        raise ValueError(f"{_OP}: softmax_scale must be > 0, got {softmax_scale}")
    if query_offset < 0:
        raise ValueError(f"{_OP}: query_offset must be >= 0 (the cached length), got {query_offset}")


def relative_position_attention(q, k, v, bias_table, *, bidirectional, num_buckets, max_distance, causal=False,
                                key_padding_mask=None, softmax_scale=1.0, query_offset=0, dropout_p=0.0):
    """Attention of q (B, H, T, D) over k, v (B, Hkv, S, D) with T5's relative position bias from
    bias_table (num_buckets, H), the (H, T, S) bias never materialised -> (B, H, T, D); see the module
    docstring. Gradients flow to q, k, v and bias_table. Under autocast q, k, v are cast to the autocast dtype
    (the bias and the softmax stay fp32)."""
    amp = _amp.autocast_dtype(q.device.type)
    if amp is not None:
        with _amp.autocast_off(q.device.type):
            return relative_position_attention(
                q.to(amp), k.to(amp), v.to(amp), bias_table, bidirectional=bidirectional, num_buckets=num_buckets,
                max_distance=max_distance, causal=causal, key_padding_mask=key_padding_mask,
                softmax_scale=softmax_scale, query_offset=query_offset, dropout_p=dropout_p)
    query_offset = int(query_offset)
    _check(q, k, v, bias_table, bidirectional, num_buckets, max_distance, causal, key_padding_mask, softmax_scale,
           query_offset, dropout_p)
    B, H, T, _ = q.shape
    if B * H * T * k.shape[2] <= _COMPOSITE_SCORES and _backend_for(q) == "torch":
        return _composite(q, k, v, bias_table, key_padding_mask, bool(causal), float(softmax_scale),
                          bool(bidirectional), int(num_buckets), int(max_distance), query_offset, float(dropout_p))
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    o, _ = _RPA.forward(q, k, v, bias_table, key_padding_mask, bool(causal), float(softmax_scale),
                        bool(bidirectional), int(num_buckets), int(max_distance), query_offset, float(dropout_p), seed)
    return o
