"""FlashAttention-2 forward and backward (the math and the masks are specified in fastnlg/ops/attention.py).

Forward, one program per (query block of BLOCK_M rows, batch-or-sequence x query head):
    for each key block of BLOCK_N keys that the block's rows can see (causal / window bound the range):
        S = scale * Q K^T (fp32), softcap, mask;  m' = max(m, rowmax S);  P = exp(S - m')
        l = l exp(m - m') + rowsum P;  acc = acc exp(m - m') + dropout(P) V
    O = acc / l;  LSE = m + log l   (LSE = +inf for a row that sees no key: O = 0, and backward's P = 0)
Backward, FA2 without atomics, Delta = rowsum(dO * O) precomputed:
    dK/dV kernel, one program per (key block, batch x kv head): loops over the GROUP query heads that
        share the kv head and over the query blocks that see the key block:
        P = exp(S - LSE);  dV += dropout(P)^T dO;  dP = dropout'(dO V^T);  dS = P (dP - Delta) (* softcap');
        dK += scale dS^T Q
    dQ kernel, one program per (query block, batch x query head): the forward's key loop, dQ += scale dS K.
Dropout: keep_ij = rand(seed + bh, row_i * S_total + col_j) >= p (Philox; forward and backward draw the
same numbers). Variable length: with IS_VARLEN the batch axis indexes packed sequences [CU[n], CU[n+1]).
The head dim is padded to BLOCK_D (a power of 2) inside the kernel with masked loads.
Tiles: BLOCK_M x BLOCK_N (and warps, stages) are measured per problem shape on the GPU at hand from the
candidates in FWD_CONFIGS / BWD_CONFIGS (kernels/_autotune.py); the kernels are correct for any of them.
"""
import torch
import triton
import triton.language as tl

from ._arch import group_name
from ._autotune import device_arch, has_candidate, tuned_launch
from ._dot import dot
from ._launch import TRITON_DTYPE, declared_signature

# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, in order of preference: the
# launchers time the candidates of the GPU at hand and keep the fastest per problem shape (kernels/_autotune.py);
# the untuned default is the first candidate there. A config that spills registers or overflows shared memory
# on an architecture is no candidate on it (kernels/_arch.py, kernels/_excluded.py): the large tiles serve the
# big GPUs, the small ones the consumer GPUs (sm_75's 64 KB, sm_86/89/120's 99 KB of shared memory) and every
# group has a candidate that compiles cleanly everywhere (the AOT tier checks it). The backward table serves the
# dK/dV and the dQ kernel, tuned separately. fp32 inputs (rare on a GPU, but supported) take smaller tiles:
# twice the bytes per element.
FWD_CONFIGS = {
    32: [(128, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 1)],
    64: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2),
         (32, 32, 4, 1)],
    128: [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2),
          (32, 32, 8, 1), (16, 32, 4, 1)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
}
BWD_CONFIGS = {
    32: [(64, 64, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (16, 16, 4, 1)],
    64: [(64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2),
         (16, 32, 4, 1)],
    128: [(64, 64, 8, 1), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1), (16, 32, 4, 1),
          (16, 16, 4, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
    256: [(32, 32, 8, 1), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
}
FWD_CONFIGS_FP32 = {32: [(64, 32, 4, 2), (32, 32, 4, 1)], 64: [(64, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1)],
                    128: [(32, 32, 4, 2), (32, 32, 8, 1), (16, 32, 4, 1)], 256: [(16, 16, 4, 1), (16, 16, 2, 1)]}
BWD_CONFIGS_FP32 = {32: [(32, 32, 4, 1), (16, 16, 4, 1)], 64: [(32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
                    128: [(32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
                    256: [(16, 16, 4, 1), (16, 16, 2, 1), (16, 16, 8, 1)]}
INTERPRET_BLOCK = 16  # small blocks under TRITON_INTERPRET so CPU tests cross several blocks quickly
INTERPRET_CONFIG = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1)  # tests set other tile shapes here
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


@triton.jit
def _head(P, b, h, stride_b, stride_h):
    """Base pointer of (batch b, head h) in a (B, H, rows, D) tensor."""
    return P + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _rows(base, rows, stride, offs_d):
    """(len(rows), BLOCK_D) pointers to base[rows, offs_d]."""
    return base + rows[:, None].to(tl.int64) * stride + offs_d[None, :]


@triton.jit
def _softcap(s, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(s / softcap), tanh(u) = 2 sigmoid(2u) - 1 (single return; see cross_entropy.py)."""
    z = s
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return z


@triton.jit
def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(rows of q, rows of k) fp32 scores softcap(scale Q K^T), before masking: the one definition the
    forward, decode and backward kernels share."""
    return _softcap(dot(q, tl.trans(k)) * scale, softcap, HAS_SOFTCAP)


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key block of the online softmax over masked scores s (-inf = invisible): the block's
    P = exp(s - m'), the rescale factor exp(m - m') for what was accumulated, m' and l' (a row that has
    seen no key yet keeps m = -inf and P = 0)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _visible(offs_m, offs_n, q_len, k_len, left, right, KPM, kpm_row, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
             shift=0):
    """(BLOCK_M, BLOCK_N) bool: key j visible to query i at position i + k_len - q_len + shift (bottom-right
    aligned; relative_position_attention's query_offset shifts it)."""
    pos = offs_m + (k_len - q_len) + shift
    j = offs_n[None, :]
    ok = (offs_m[:, None] < q_len) & (j < k_len)
    if CAUSAL:
        ok = ok & (j <= pos[:, None])
    ok = ok & ((left < 0) | (j >= pos[:, None] - left))
    ok = ok & ((right < 0) | (j <= pos[:, None] + right))
    if HAS_KPM:
        keep = tl.load(KPM + kpm_row + offs_n, mask=offs_n < k_len, other=0)
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def _key_range(m0, q_len, k_len, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               shift):
    """[lo, hi) of the keys rows m0 .. m0 + BLOCK_M - 1 can see, lo a multiple of BLOCK_N."""
    first = m0 + k_len - q_len + shift
    last = first + BLOCK_M - 1
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
    hi = tl.where(right >= 0, tl.minimum(hi, last + right + 1), hi)
    lo = tl.where(left >= 0, tl.maximum(first - left, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _seq_bounds(CU, b, T, S, IS_VARLEN: tl.constexpr):
    """(batch index into the tensors, first row, q_len, k_len) of program-axis entry b (single return: the
    compiler rejects returns inside constexpr branches)."""
    bb = b
    start = 0
    q_len = T
    k_len = S
    if IS_VARLEN:
        start = tl.load(CU + b)
        q_len = tl.load(CU + b + 1) - start
        k_len = q_len
        bb = 0
    return bb, start, q_len, k_len


@triton.jit
def _query_program(CU, T, S, Hq, GROUP, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What a (query block, batch-or-sequence x query head) program works on: (pid_bh, tensor batch index,
    query head, kv head, first row, q_len, k_len, first query row of the block)."""
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    b, row0, q_len, k_len = _seq_bounds(CU, pid_bh // Hq, T, S, IS_VARLEN)
    return pid_bh, b, h, h // GROUP, row0, q_len, k_len, tl.program_id(0) * BLOCK_M


@triton.jit
def _dropout_keep(seed, bh, rows, cols, s_total, dropout_p):
    offsets = rows[:, None] * s_total + cols[None, :]
    return tl.rand(seed + bh, offsets) >= dropout_p


@triton.jit
def _relpos_index(offs_m, offs_n, q_len, k_len, shift, maxd):
    """(BLOCK_M, BLOCK_N) index of j - p_i clamped to [-maxd, maxd], + maxd: into the lookups of
    relative_position_attention (fastnlg/ops/relative_position_attention.py)."""
    pos = offs_m + (k_len - q_len) + shift
    return tl.minimum(tl.maximum(offs_n[None, :] - pos[:, None], -maxd), maxd) + maxd


@triton.jit
def _relpos_bias(s, offs_m, offs_n, q_len, k_len, shift, RB, h, maxd, HAS_RELPOS: tl.constexpr):
    """s + bias_table[bucket(j - p_i), h], the bias read from RB (H, 2 maxd + 1) (single return)."""
    z = s
    if HAS_RELPOS:
        idx = _relpos_index(offs_m, offs_n, q_len, k_len, shift, maxd)
        z = s + tl.load(RB + h.to(tl.int64) * (2 * maxd + 1) + idx)
    return z


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE: "*fp32", KPM: "*u8", CU: "*i32", RB: "*fp32",
                    sqb: tl.int64, sqh: tl.int32, sqt: tl.int32, skb: tl.int64, skh: tl.int32, skt: tl.int32,
                    svb: tl.int64, svh: tl.int32, svt: tl.int32, sob: tl.int64, soh: tl.int32, sot: tl.int32,
                    slb: tl.int64, slh: tl.int32, skpm: tl.int64,
                    T: tl.int32, S: tl.int32, Hq: tl.int32, GROUP: tl.int32, D: tl.int32, scale: tl.float32,
                    softcap: tl.float32, left: tl.int32, right: tl.int32, dropout_p: tl.float32, seed: tl.int32,
                    shift: tl.int32, maxd: tl.int32,
                    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                    IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr, HAS_RELPOS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh, b, h, hk, row0, q_len, k_len, m0 = _query_program(CU, T, S, Hq, GROUP, BLOCK_M, IS_VARLEN)
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_ptr = _head(Q, b, h, sqb, sqh)
        k_ptr = _head(K, b, hk, skb, skh)
        v_ptr = _head(V, b, hk, svb, svh)
        q = tl.load(_rows(q_ptr, row0 + offs_m, sqt, offs_d),
                    mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, hi = _key_range(m0, q_len, k_len, left, right, BLOCK_M, BLOCK_N, CAUSAL, shift)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n[:, None] < k_len) & d_ok[None, :]
            k = tl.load(_rows(k_ptr, row0 + offs_n, skt, offs_d), mask=kv_ok, other=0.0)
            ok = _visible(offs_m, offs_n, q_len, k_len, left, right, KPM, b.to(tl.int64) * skpm, CAUSAL, HAS_KPM,
                          shift)
            s = _relpos_bias(_scores(q, k, scale, softcap, HAS_SOFTCAP), offs_m, offs_n, q_len, k_len, shift, RB, h,
                             maxd, HAS_RELPOS)
            s = tl.where(ok, s, -float("inf"))  # (BLOCK_M, BLOCK_N)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc = acc * alpha[:, None]
            if DROPOUT:
                keep = _dropout_keep(seed, pid_bh, row0 + offs_m, row0 + offs_n, S, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            v = tl.load(_rows(v_ptr, row0 + offs_n, svt, offs_d), mask=kv_ok, other=0.0)
            acc += dot(p.to(v.dtype), v)
        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        row_ok = offs_m < q_len
        tl.store(_rows(_head(O, b, h, sob, soh), row0 + offs_m, sot, offs_d), o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(_head(LSE, b, h, slb, slh) + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_scores(q, k, scale, softcap, offs_m, offs_n, q_len, k_len, left, right, KPM, kpm_row, lse, shift, RB, h,
                maxd, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_RELPOS: tl.constexpr):
    """P = exp(S - LSE) (0 where invisible) and the softcap derivative factor dS/dS_raw."""
    z = _scores(q, k, scale, softcap, HAS_SOFTCAP)
    ok = _visible(offs_m, offs_n, q_len, k_len, left, right, KPM, kpm_row, CAUSAL, HAS_KPM, shift)
    zb = _relpos_bias(z, offs_m, offs_n, q_len, k_len, shift, RB, h, maxd, HAS_RELPOS)
    p = tl.where(ok, tl.exp(zb - lse[:, None]), 0.0)
    t = z / softcap
    dcap = 1.0 - t * t
    return p, dcap


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE: "*fp32", DELTA: "*fp32", DK, DV, KPM: "*u8", CU: "*i32", RB: "*fp32",
                         sqb: tl.int64, sqh: tl.int32, sqt: tl.int32, skb: tl.int64, skh: tl.int32, skt: tl.int32,
                         svb: tl.int64, svh: tl.int32, svt: tl.int32, sdob: tl.int64, sdoh: tl.int32,
                         sdot: tl.int32, slb: tl.int64, slh: tl.int32, sdkb: tl.int64, sdkh: tl.int32,
                         sdkt: tl.int32, sdvb: tl.int64, sdvh: tl.int32, sdvt: tl.int32, skpm: tl.int64,
                         T: tl.int32, S: tl.int32, Hkv: tl.int32, GROUP: tl.int32, D: tl.int32, scale: tl.float32,
                         softcap: tl.float32, left: tl.int32, right: tl.int32, dropout_p: tl.float32,
                         seed: tl.int32, shift: tl.int32, maxd: tl.int32,
                         CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                         IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr, HAS_RELPOS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b_prog = pid_bh // Hkv
    hk = pid_bh % Hkv
    b, row0, q_len, k_len = _seq_bounds(CU, b_prog, T, S, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < k_len:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kv_ok = (offs_n[:, None] < k_len) & d_ok[None, :]
        k = tl.load(_rows(_head(K, b, hk, skb, skh), row0 + offs_n, skt, offs_d), mask=kv_ok, other=0.0)
        v = tl.load(_rows(_head(V, b, hk, svb, svh), row0 + offs_n, svt, offs_d), mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # query rows that can see keys n0 .. n0 + BLOCK_N - 1 (inverse of _key_range)
        off = k_len - q_len + shift
        lo = 0
        if CAUSAL:
            lo = tl.maximum(n0 - off, 0)
        lo = tl.where(right >= 0, tl.maximum(lo, n0 - right - off), lo)
        lo = (lo // BLOCK_M) * BLOCK_M
        hi = tl.where(left >= 0, tl.minimum(q_len, n0 + BLOCK_N + left - off), q_len)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_ptr = _head(Q, b, h, sqb, sqh)
            do_ptr = _head(DO, b, h, sdob, sdoh)
            l_ptr = b.to(tl.int64) * slb + h.to(tl.int64) * slh + row0
            bh = b_prog * (Hkv * GROUP) + h
            for m0 in range(lo, hi, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q_ok = (offs_m[:, None] < q_len) & d_ok[None, :]
                q = tl.load(_rows(q_ptr, row0 + offs_m, sqt, offs_d), mask=q_ok, other=0.0)
                do = tl.load(_rows(do_ptr, row0 + offs_m, sdot, offs_d), mask=q_ok,
                             other=0.0)
                lse = tl.load(LSE + l_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
                delta = tl.load(DELTA + l_ptr + offs_m, mask=offs_m < q_len, other=0.0)
                p, dcap = _bwd_scores(q, k, scale, softcap, offs_m, offs_n, q_len, k_len, left, right, KPM,
                                      b.to(tl.int64) * skpm, lse, shift, RB, h, maxd, CAUSAL, HAS_SOFTCAP, HAS_KPM,
                                      HAS_RELPOS)
                dp = dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
                pd = p
                if DROPOUT:
                    keep = _dropout_keep(seed, bh, row0 + offs_m, row0 + offs_n, S, dropout_p)
                    pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                dv += dot(tl.trans(pd).to(do.dtype), do)
                ds = p * (dp - delta[:, None])
                if HAS_SOFTCAP:
                    ds = ds * dcap
                dk += dot(tl.trans(ds).to(q.dtype), q)
        dk = dk * scale
        tl.store(_rows(_head(DK, b, hk, sdkb, sdkh), row0 + offs_n, sdkt, offs_d), dk.to(DK.dtype.element_ty),
                 mask=kv_ok)
        tl.store(_rows(_head(DV, b, hk, sdvb, sdvh), row0 + offs_n, sdvt, offs_d), dv.to(DV.dtype.element_ty),
                 mask=kv_ok)


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE: "*fp32", DELTA: "*fp32", DQ, KPM: "*u8", CU: "*i32", RB: "*fp32",
                       BK: "*i32", PART: "*fp32",
                       sqb: tl.int64, sqh: tl.int32, sqt: tl.int32, skb: tl.int64, skh: tl.int32, skt: tl.int32,
                       svb: tl.int64, svh: tl.int32, svt: tl.int32, sdob: tl.int64, sdoh: tl.int32, sdot: tl.int32,
                       slb: tl.int64, slh: tl.int32, sdqb: tl.int64, sdqh: tl.int32, sdqt: tl.int32, skpm: tl.int64,
                       T: tl.int32, S: tl.int32, Hq: tl.int32, GROUP: tl.int32, D: tl.int32, scale: tl.float32,
                       softcap: tl.float32, left: tl.int32, right: tl.int32, dropout_p: tl.float32, seed: tl.int32,
                       shift: tl.int32, maxd: tl.int32, part_rows: tl.int32,
                       CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                       IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr, HAS_RELPOS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NB_PAD: tl.constexpr):
    pid_bh, b, h, hk, row0, q_len, k_len, m0 = _query_program(CU, T, S, Hq, GROUP, BLOCK_M, IS_VARLEN)
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_ok = (offs_m[:, None] < q_len) & d_ok[None, :]
        q = tl.load(_rows(_head(Q, b, h, sqb, sqh), row0 + offs_m, sqt, offs_d), mask=q_ok, other=0.0)
        do = tl.load(_rows(_head(DO, b, h, sdob, sdoh), row0 + offs_m, sdot, offs_d), mask=q_ok, other=0.0)
        l_ptr = b.to(tl.int64) * slb + h.to(tl.int64) * slh + row0
        lse = tl.load(LSE + l_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
        delta = tl.load(DELTA + l_ptr + offs_m, mask=offs_m < q_len, other=0.0)
        k_ptr = _head(K, b, hk, skb, skh)
        v_ptr = _head(V, b, hk, svb, svh)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        offs_nb = tl.arange(0, NB_PAD)
        dtab = tl.zeros([NB_PAD], dtype=tl.float32)  # this program's part of d bias_table[:, h]
        lo, hi = _key_range(m0, q_len, k_len, left, right, BLOCK_M, BLOCK_N, CAUSAL, shift)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n[:, None] < k_len) & d_ok[None, :]
            k = tl.load(_rows(k_ptr, row0 + offs_n, skt, offs_d), mask=kv_ok, other=0.0)
            v = tl.load(_rows(v_ptr, row0 + offs_n, svt, offs_d), mask=kv_ok, other=0.0)
            p, dcap = _bwd_scores(q, k, scale, softcap, offs_m, offs_n, q_len, k_len, left, right, KPM,
                                  b.to(tl.int64) * skpm, lse, shift, RB, h, maxd, CAUSAL, HAS_SOFTCAP, HAS_KPM,
                                  HAS_RELPOS)
            dp = dot(do, tl.trans(v))
            if DROPOUT:
                keep = _dropout_keep(seed, pid_bh, row0 + offs_m, row0 + offs_n, S, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_RELPOS:  # the tile's dS summed by bucket (the buckets it holds: one, far from the diagonal)
                bk = tl.load(BK + _relpos_index(offs_m, offs_n, q_len, k_len, shift, maxd))
                bk = tl.where(p > 0.0, bk, NB_PAD)  # (invisible (i, j): dS = 0, no bucket)
                for nb in range(tl.min(tl.min(bk, axis=1), axis=0), tl.minimum(tl.max(tl.max(bk, axis=1), axis=0) + 1, NB_PAD)):
                    dtab += tl.where(offs_nb == nb, tl.sum(tl.sum(tl.where(bk == nb, ds, 0.0), axis=1), axis=0), 0.0)
            if HAS_SOFTCAP:
                ds = ds * dcap
            dq += dot(ds.to(k.dtype), k)
        dq = dq * scale
        tl.store(_rows(_head(DQ, b, h, sdqb, sdqh), row0 + offs_m, sdqt, offs_d), dq.to(DQ.dtype.element_ty), mask=q_ok)
        if HAS_RELPOS:
            tl.store(PART + (pid_bh.to(tl.int64) * part_rows + tl.program_id(0)) * NB_PAD + offs_nb, dtab)


def _config_table(backward, dtype):
    if dtype == torch.float32:
        return BWD_CONFIGS_FP32 if backward else FWD_CONFIGS_FP32
    return BWD_CONFIGS if backward else FWD_CONFIGS


# Launch groups that may have no candidate on some architecture, and what runs instead (the AOT tier accepts a
# group without a candidate there only when it is named here).
_TORCH = "flash_attention runs on its torch backend (SDPA); relative_position_attention (/RP1) on its torch one"
AOT_FALLBACK = {"attn_fwd_kernel": _TORCH, "attn_bwd_dkdv_kernel": _TORCH, "attn_bwd_dq_kernel": _TORCH}


def _group(kernel, dtype, block_d: int, relpos: bool) -> str:
    """The launch group (kernels/_arch.py): T5's relative position bias is a group of its own, so that its
    extra registers exclude configs only for its own launches."""
    return group_name(kernel.fn.__name__, TRITON_DTYPE[dtype], D=block_d, **({"RP": 1} if relpos else {}))


def unsupported(dtype, D: int, device, backward: bool, relpos: bool = False) -> str | None:
    """Why the kernels cannot run attention of head dim D in `dtype` (with its backward when `backward`, with
    T5's relative position bias when `relpos`) on `device`: a launch group without a config that compiles
    cleanly for its architecture; None when they can."""
    block_d = max(32, triton.next_power_of_2(D))
    kernels = [(attn_fwd_kernel, False)] + ([(attn_bwd_dkdv_kernel, True), (attn_bwd_dq_kernel, True)]
                                            if backward else [])
    for kernel, bwd in kernels:
        table = _config_table(bwd, dtype)
        group = _group(kernel, dtype, block_d, relpos)
        if block_d in table and not has_candidate(group, table[block_d], device):
            return f"{group} has no config that compiles without spills for sm_{device_arch(device)}"
    return None


def _tuned_launch(name, kernel, grid_rows, n_heads_prog, args, flags, D, backward, dtype, sizes, device):
    """Launch `kernel` with the config measured fastest for this problem (kernels/_autotune.py): grid
    (cdiv(grid_rows, BLOCK_M or BLOCK_N), n_heads_prog), the rows' block being BLOCK_N for the dK/dV kernel."""
    block_d = max(32, triton.next_power_of_2(D))
    rows_block = "BLOCK_N" if name == "attn_bwd_dkdv" else "BLOCK_M"
    key = (name, dtype, block_d, *flags.values(), *(triton.next_power_of_2(max(1, n)) for n in sizes))
    tuned_launch(kernel, _config_table(backward, dtype)[block_d], CONFIG_FIELDS, INTERPRET_CONFIG,
                 lambda cfg: (triton.cdiv(grid_rows, cfg[rows_block]), n_heads_prog), key, args,
                 {**flags, "BLOCK_D": block_d}, device, group=_group(kernel, dtype, block_d, flags["HAS_RELPOS"]))


def _common(q, k, cu_seqlens, max_seqlen, key_padding_mask):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    varlen = cu_seqlens is not None
    n_prog_b = cu_seqlens.numel() - 1 if varlen else B
    rows_q = max_seqlen if varlen else T
    rows_k = max_seqlen if varlen else S
    kpm = key_padding_mask if key_padding_mask is not None else q  # dummy pointer when unused
    cu = cu_seqlens if varlen else q
    return B, Hq, Hkv, T, S, D, varlen, n_prog_b, rows_q, rows_k, kpm, cu


def _flags(causal, softcap, key_padding_mask, varlen, dropout_p, relpos=None):
    return dict(CAUSAL=causal, HAS_SOFTCAP=softcap is not None, HAS_KPM=key_padding_mask is not None,
                IS_VARLEN=varlen, DROPOUT=dropout_p > 0, HAS_RELPOS=relpos is not None)


def _relpos(relpos, T, S, dummy):
    """(bias lookup RB, bucket lookup, shift, max distance) for the kernels' HAS_RELPOS arguments; dummies
    without it. relpos: relative_position_attention's lookups (fastnlg/ops/relative_position_attention.py)."""
    if relpos is None:
        return dummy, dummy, 0, 0
    return (relpos["bias_lut"], relpos["bucket_lut"], relpos["query_offset"] - (S - T), relpos["max_distance"])


def forward(q, k, v, *, causal, scale, softcap, window, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, seed,
            relpos=None):
    """q (B, Hq, T, D), k/v (B, Hkv, S, D), unit stride in D; key_padding_mask (B, S) uint8 or None;
    cu_seqlens int32 (n + 1,) with B = 1; relpos: T5's relative position bias (see _relpos).
    -> (o like q, lse (B, Hq, T) fp32)."""
    B, Hq, Hkv, T, S, D, varlen, nb, rows_q, rows_k, kpm, cu = _common(q, k, cu_seqlens, max_seqlen,
                                                                       key_padding_mask)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    left, right = window
    rb, _, shift, maxd = _relpos(relpos, T, S, lse)
    args = (q, k, v, o, lse, kpm, cu, rb, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            lse.stride(0), lse.stride(1), key_padding_mask.stride(0) if key_padding_mask is not None else 0,
            T, S, Hq, Hq // Hkv, D, scale, softcap or 1.0, left, right, dropout_p, seed, shift, maxd)
    flags = _flags(causal, softcap, key_padding_mask, varlen, dropout_p, relpos)
    _tuned_launch("attn_fwd", attn_fwd_kernel, rows_q, nb * Hq, args, flags, D, False, q.dtype,
                  (rows_q, rows_k, nb * Hq), q.device)
    return o, lse


def backward(do, q, k, v, o, lse, *, causal, scale, softcap, window, key_padding_mask, cu_seqlens, max_seqlen,
             dropout_p, seed, relpos=None):
    """-> (dq, dk, dv), and d bias_table (num_buckets, Hq) fp32 with relpos; Delta = rowsum(dO * O) in fp32.
    The bias table's gradient: each dQ program writes its (query block, head)'s sums by bucket into a row of
    `part`, sized for the smallest BLOCK_M any config has (the tuned one leaves the other rows zero), summed
    here."""
    B, Hq, Hkv, T, S, D, varlen, nb, rows_q, rows_k, kpm, cu = _common(q, k, cu_seqlens, max_seqlen, key_padding_mask)
    delta = (do.float() * o.float()).sum(-1)  # (B, Hq, T)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    left, right = window
    skpm = key_padding_mask.stride(0) if key_padding_mask is not None else 0
    flags = _flags(causal, softcap, key_padding_mask, varlen, dropout_p, relpos)
    rb, bk, shift, maxd = _relpos(relpos, T, S, lse)
    nb_pad = triton.next_power_of_2(relpos["num_buckets"]) if relpos is not None else 1
    smallest_m = (min(c[0] for t in _config_table(True, q.dtype).values() for c in t) if q.device.type == "cuda"
                  else INTERPRET_CONFIG[0])  # (CPU tensors run the interpreter's config)
    part_rows = triton.cdiv(rows_q, smallest_m)
    part = (torch.zeros(nb * Hq * part_rows, nb_pad, dtype=torch.float32, device=q.device) if relpos is not None
            else lse)
    scalars = (D, scale, softcap or 1.0, left, right, dropout_p, seed, shift, maxd)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], lse.stride(0), lse.stride(1))
    sizes = (rows_q, rows_k, nb * Hq)
    _tuned_launch("attn_bwd_dkdv", attn_bwd_dkdv_kernel, rows_k, nb * Hkv,
                  (q, k, v, do, lse, delta, dk, dv, kpm, cu, rb, *strides, *dk.stride()[:3], *dv.stride()[:3], skpm,
                   T, S, Hkv, Hq // Hkv, *scalars), flags, D, True, q.dtype, sizes, q.device)
    _tuned_launch("attn_bwd_dq", attn_bwd_dq_kernel, rows_q, nb * Hq,
                  (q, k, v, do, lse, delta, dq, kpm, cu, rb, bk, part, *strides, *dq.stride()[:3], skpm, T, S, Hq,
                   Hq // Hkv, *scalars, part_rows), {**flags, "NB_PAD": nb_pad}, D, True, q.dtype, sizes, q.device)
    if relpos is None:
        return dq, dk, dv
    dtable = part.view(nb, Hq, part_rows, nb_pad).sum((0, 2))[:, :relpos["num_buckets"]].t().contiguous()
    return dq, dk, dv, dtable


# The variants the AOT tier compiles, each with every feature its launches can turn on: the most registers
# and the same tiles (shared memory) as the plainer variants, which are left out to keep CI's compile time down.
# flash_attention: everything but the relative position bias; relative_position_attention (T5): the bias with
# causal, key padding and dropout (it takes neither a soft cap nor cu_seqlens), with T5's 32 buckets.
_AOT_VARIANTS = ({"CAUSAL": True, "HAS_SOFTCAP": True, "HAS_KPM": True, "IS_VARLEN": True, "DROPOUT": True,
                  "HAS_RELPOS": False},
                 {"CAUSAL": True, "HAS_SOFTCAP": False, "HAS_KPM": True, "IS_VARLEN": False, "DROPOUT": True,
                  "HAS_RELPOS": True})


def _specs():
    """Every (kernel, variant, head-dim config, dtype table); each spec names its launch group and config
    (kernels/_arch.py)."""
    specs = []
    for kernel, backward in ((attn_fwd_kernel, False), (attn_bwd_dkdv_kernel, True), (attn_bwd_dq_kernel, True)):
        for flags in _AOT_VARIANTS:
            extra = {"NB_PAD": 32 if flags["HAS_RELPOS"] else 1} if kernel is attn_bwd_dq_kernel else {}
            for dtype in (torch.bfloat16, torch.float32):
                for block_d, configs in _config_table(backward, dtype).items():
                    group = _group(kernel, dtype, block_d, flags["HAS_RELPOS"])
                    for bm, bn, warps, stages in configs:
                        specs.append({"kernel": kernel, "signature": declared_signature(kernel, dtype),
                                      "num_warps": warps, "num_stages": stages, "group": group,
                                      "config": (bm, bn, warps, stages),
                                      "constexprs": {**flags, **extra, "BLOCK_M": bm, "BLOCK_N": bn,
                                                     "BLOCK_D": block_d}})
    return specs


AOT_SPECS = _specs()
