"""Flash-decoding: attention for few query rows per kv head against a long KV cache (generation), forward
only (the math and the masks are specified in fastnlg/ops/attention.py; the tiles' helpers are shared with
the FlashAttention-2 kernels in kernels/attention.py).

The keys are cut into splits; program (split, batch x kv head) runs the GROUP * T query rows sharing the
kv head over its split with the online softmax and writes the split's normalised output and log-sum-exp;
the splits are then merged by their log-sum-exp:  O = sum_s exp(LSE_s - LSE) O_s,  LSE = logsumexp_s LSE_s.
"""
import torch
import triton
import triton.language as tl

from ._arch import group_name
from ._autotune import has_candidate, launch_candidates
from ._dot import dot
from ._launch import TRITON_DTYPE, declared_signature
from .attention import INTERPRET_BLOCK, _head, _online_softmax, _rows, _scores, _visible


@triton.jit
def attn_decode_kernel(Q, K, V, O_PART: "*fp32", LSE_PART: "*fp32", KPM: "*u8",
                       sqb: tl.int64, sqh: tl.int32, sqt: tl.int32, skb: tl.int64, skh: tl.int32, skt: tl.int32,
                       svb: tl.int64, svh: tl.int32, svt: tl.int32, sos: tl.int32, sob: tl.int64, soh: tl.int32,
                       sot: tl.int32, sls: tl.int32, slb: tl.int64, slh: tl.int32, skpm: tl.int64,
                       T: tl.int32, S: tl.int32, Hkv: tl.int32, GROUP: tl.int32, D: tl.int32, split_len: tl.int32,
                       scale: tl.float32, softcap: tl.float32, left: tl.int32, right: tl.int32,
                       CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash-decoding: program (key split, batch x kv head) runs the GROUP * T query rows that share the kv
    head (row r = query head hk * GROUP + r // T, query r % T) over keys [split * split_len, + split_len),
    so a single query row still spreads over the GPU and K/V are read once per group. Writes the split's
    normalised output and log-sum-exp (-inf when it saw no key); the splits are merged afterwards."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_r = tl.arange(0, BLOCK_M)
    g = offs_r // T
    i = offs_r % T
    row_ok = offs_r < GROUP * T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    h = hk * GROUP + g
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + i[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptr = _head(K, b, hk, skb, skh)
    v_ptr = _head(V, b, hk, svb, svh)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(S, lo + split_len)
    lo = tl.where(left >= 0, tl.maximum(lo, ((S - T - left) // BLOCK_N) * BLOCK_N), lo)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < hi) & d_ok[None, :]
        k = tl.load(_rows(k_ptr, offs_n, skt, offs_d), mask=kv_ok, other=0.0)
        ok = _visible(i, offs_n, T, S, left, right, KPM, b.to(tl.int64) * skpm, CAUSAL, HAS_KPM, 0)
        ok = ok & row_ok[:, None] & (offs_n[None, :] < hi)
        s = tl.where(ok, _scores(q, k, scale, softcap, HAS_SOFTCAP), -float("inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        v = tl.load(_rows(v_ptr, offs_n, svt, offs_d), mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, -float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    base = split.to(tl.int64) * sos + b.to(tl.int64) * sob
    tl.store(O_PART + base + h.to(tl.int64)[:, None] * soh + i[:, None] * sot + offs_d[None, :], o,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + split.to(tl.int64) * sls + b.to(tl.int64) * slb + h.to(tl.int64) * slh + i, lse, mask=row_ok)


DECODE_MAX_ROWS = 32  # GROUP * T query rows per program (Llama-3 70B: GROUP 8 x T up to 4)
# Candidate (BLOCK_N keys per tile, num_warps) per padded head dim, in order of preference: the first that is
# a candidate on the GPU at hand runs (kernels/_arch.py: no config that spills or overflows shared memory there).
DECODE_CONFIGS = {torch.bfloat16: {32: [(64, 4), (32, 4)], 64: [(64, 4), (32, 4), (16, 4)],
                                   128: [(64, 4), (32, 4), (32, 8), (16, 4), (16, 8)],
                                   256: [(32, 4), (16, 4), (16, 8), (16, 16)]},
                  torch.float32: {32: [(64, 4), (32, 4)], 64: [(32, 4), (16, 4)], 128: [(32, 4), (16, 4), (16, 8)],
                                  256: [(16, 4), (16, 8), (16, 16)]}}


AOT_FALLBACK = {"attn_decode_kernel": "the FlashAttention-2 forward kernel runs the decode step"}


def decode_eligible(q, k, dropout_p, cu_seqlens):
    """Flash-decoding applies to inference with few query rows per kv head against a longer KV cache, where
    the GPU's architecture has a decode config (else the FlashAttention-2 forward runs it: AOT_FALLBACK)."""
    group_rows = q.shape[1] // k.shape[1] * q.shape[2]
    if not (dropout_p == 0 and cu_seqlens is None and group_rows <= DECODE_MAX_ROWS and k.shape[2] >= 4 * q.shape[2]):
        return False
    table = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    block_d = max(32, triton.next_power_of_2(q.shape[-1]))
    return block_d not in DECODE_CONFIGS[table] or has_candidate(_group(table, block_d), DECODE_CONFIGS[table][block_d],
                                                                 q.device)


def decode(q, k, v, *, causal, scale, softcap, window, key_padding_mask, n_splits=None):
    """Forward only: splits the keys, runs attn_decode_kernel, merges the splits by their log-sum-exp."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_d = max(32, triton.next_power_of_2(D))
    table = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    if q.device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors
        block_n, warps = INTERPRET_BLOCK, 4
    else:
        block_n, warps = launch_candidates(_group(table, block_d), DECODE_CONFIGS[table][block_d], q.device)[0]
    block_m = max(16, triton.next_power_of_2(group * T))
    if n_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        n_splits = max(1, min(triton.cdiv(S, 4 * block_n), triton.cdiv(2 * sms, B * Hkv)))
    split_len = triton.cdiv(triton.cdiv(S, n_splits), block_n) * block_n
    n_splits = triton.cdiv(S, split_len)
    o_part = torch.empty(n_splits, B, Hq, T, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(n_splits, B, Hq, T, dtype=torch.float32, device=q.device)
    left, right = window
    kpm = key_padding_mask if key_padding_mask is not None else q
    attn_decode_kernel[(n_splits, B * Hkv)](
        q, k, v, o_part, lse_part, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o_part.stride()[:4],
        *lse_part.stride()[:3], key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        T, S, Hkv, group, D, split_len, scale, softcap or 1.0, left, right,
        CAUSAL=causal, HAS_SOFTCAP=softcap is not None, HAS_KPM=key_padding_mask is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=2)
    lse = torch.logsumexp(lse_part, dim=0)  # (B, Hq, T); -inf where no split saw a key
    weight = torch.exp(lse_part - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    return (weight[..., None] * o_part).sum(0).to(q.dtype)


def _group(dtype, block_d):
    return group_name("attn_decode_kernel", TRITON_DTYPE[dtype], D=block_d)


def _specs():
    return [{"kernel": attn_decode_kernel, "signature": declared_signature(attn_decode_kernel, dtype),
             "num_warps": warps, "num_stages": 2, "group": _group(dtype, block_d), "config": (block_n, warps),
             "constexprs": {"CAUSAL": True, "HAS_SOFTCAP": True, "HAS_KPM": True, "BLOCK_M": DECODE_MAX_ROWS,
                            "BLOCK_N": block_n, "BLOCK_D": block_d}}
            for dtype, table in DECODE_CONFIGS.items() for block_d, configs in table.items()
            for block_n, warps in configs]


AOT_SPECS = _specs()
