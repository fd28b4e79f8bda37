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

from ._launch import TRITON_DTYPE

# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, the first the default: the
# launchers time them on the GPU at hand and keep the fastest per problem shape (kernels/_autotune.py).
# Every entry fits the 99 KB shared memory of sm_86/sm_89 (the AOT tier compiles all of them), so consumer
# GPUs can run each one; D = 256 backward has room for 32 x 32 tiles only. D = 32 (tiny models) gets one
# config, to spend CI's compile time where tuning pays. The backward table serves the dK/dV and the dQ
# kernel, tuned separately. fp32 inputs (rare on a GPU, but supported) take one config of half the tile
# size: twice the bytes per element.
FWD_CONFIGS = {
    32: [(128, 64, 8, 3)],
    64: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
    128: [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
}
BWD_CONFIGS = {
    32: [(64, 64, 4, 2)],
    64: [(64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
    128: [(64, 64, 8, 1), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
    256: [(32, 32, 8, 1), (32, 32, 4, 2)],
}
FWD_CONFIGS_FP32 = {32: [(64, 32, 4, 2)], 64: [(64, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(16, 16, 4, 1)]}
BWD_CONFIGS_FP32 = {32: [(32, 32, 4, 1)], 64: [(32, 32, 4, 1)], 128: [(32, 32, 4, 1)], 256: [(16, 16, 4, 1)]}
INTERPRET_BLOCK = 16  # small blocks under TRITON_INTERPRET so CPU tests cross several blocks quickly
INTERPRET_CONFIG = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1)  # tests set other tile shapes here


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
    return _softcap(tl.dot(q, tl.trans(k)) * scale, softcap, HAS_SOFTCAP)


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
def _visible(offs_m, offs_n, q_len, k_len, left, right, KPM, kpm_row, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key j visible to query i (bottom-right aligned positions)."""
    pos = offs_m + (k_len - q_len)
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
def _key_range(m0, q_len, k_len, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, hi) of the keys rows m0 .. m0 + BLOCK_M - 1 can see, lo a multiple of BLOCK_N."""
    first = m0 + k_len - q_len
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
def attn_fwd_kernel(Q, K, V, O, LSE, KPM, CU,
                    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, skpm,
                    T, S, Hq, GROUP, D, scale, softcap, left, right, dropout_p, seed,
                    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                    IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
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
        lo, hi = _key_range(m0, q_len, k_len, left, right, BLOCK_M, BLOCK_N, CAUSAL)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n[:, None] < k_len) & d_ok[None, :]
            k = tl.load(_rows(k_ptr, row0 + offs_n, skt, offs_d), mask=kv_ok, other=0.0)
            ok = _visible(offs_m, offs_n, q_len, k_len, left, right, KPM, b.to(tl.int64) * skpm, CAUSAL, HAS_KPM)
            s = tl.where(ok, _scores(q, k, scale, softcap, HAS_SOFTCAP), -float("inf"))  # (BLOCK_M, BLOCK_N)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc = acc * alpha[:, None]
            if DROPOUT:
                keep = _dropout_keep(seed, pid_bh, row0 + offs_m, row0 + offs_n, S, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            v = tl.load(_rows(v_ptr, row0 + offs_n, svt, offs_d), mask=kv_ok, other=0.0)
            acc += tl.dot(p.to(v.dtype), v)
        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        row_ok = offs_m < q_len
        tl.store(_rows(_head(O, b, h, sob, soh), row0 + offs_m, sot, offs_d), o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(_head(LSE, b, h, slb, slh) + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_scores(q, k, scale, softcap, offs_m, offs_n, q_len, k_len, left, right, KPM, kpm_row, lse,
                CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr):
    """P = exp(S - LSE) (0 where invisible) and the softcap derivative factor dS/dS_raw."""
    z = _scores(q, k, scale, softcap, HAS_SOFTCAP)
    ok = _visible(offs_m, offs_n, q_len, k_len, left, right, KPM, kpm_row, CAUSAL, HAS_KPM)
    p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
    t = z / softcap
    dcap = 1.0 - t * t
    return p, dcap


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, slb, slh,
                         sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, skpm,
                         T, S, Hkv, GROUP, D, scale, softcap, left, right, dropout_p, seed,
                         CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                         IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
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
        off = k_len - q_len
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
                                      b.to(tl.int64) * skpm, lse, CAUSAL, HAS_SOFTCAP, HAS_KPM)
                dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
                pd = p
                if DROPOUT:
                    keep = _dropout_keep(seed, bh, row0 + offs_m, row0 + offs_n, S, dropout_p)
                    pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                dv += tl.dot(tl.trans(pd).to(do.dtype), do)
                ds = p * (dp - delta[:, None])
                if HAS_SOFTCAP:
                    ds = ds * dcap
                dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        dk = dk * scale
        tl.store(_rows(_head(DK, b, hk, sdkb, sdkh), row0 + offs_n, sdkt, offs_d), dk.to(DK.dtype.element_ty),
                 mask=kv_ok)
        tl.store(_rows(_head(DV, b, hk, sdvb, sdvh), row0 + offs_n, sdvt, offs_d), dv.to(DV.dtype.element_ty),
                 mask=kv_ok)


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, CU,
                       sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, slb, slh, sdqb, sdqh, sdqt, skpm,
                       T, S, Hq, GROUP, D, scale, softcap, left, right, dropout_p, seed,
                       CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                       IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
        lo, hi = _key_range(m0, q_len, k_len, left, right, BLOCK_M, BLOCK_N, CAUSAL)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n[:, None] < k_len) & d_ok[None, :]
            k = tl.load(_rows(k_ptr, row0 + offs_n, skt, offs_d), mask=kv_ok, other=0.0)
            v = tl.load(_rows(v_ptr, row0 + offs_n, svt, offs_d), mask=kv_ok, other=0.0)
            p, dcap = _bwd_scores(q, k, scale, softcap, offs_m, offs_n, q_len, k_len, left, right, KPM,
                                  b.to(tl.int64) * skpm, lse, CAUSAL, HAS_SOFTCAP, HAS_KPM)
            dp = tl.dot(do, tl.trans(v))
            if DROPOUT:
                keep = _dropout_keep(seed, pid_bh, row0 + offs_m, row0 + offs_n, S, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * dcap
            dq += tl.dot(ds.to(k.dtype), k)
        dq = dq * scale
        tl.store(_rows(_head(DQ, b, h, sdqb, sdqh), row0 + offs_m, sdqt, offs_d), dq.to(DQ.dtype.element_ty), mask=q_ok)


def _config_table(backward, dtype):
    if dtype == torch.float32:
        return BWD_CONFIGS_FP32 if backward else FWD_CONFIGS_FP32
    return BWD_CONFIGS if backward else FWD_CONFIGS


def _candidates(D, backward, dtype):
    """(BLOCK_D, the configs to choose from) for head dim D."""
    from fastnlg.backend import triton_interpret

    block_d = max(32, triton.next_power_of_2(D))
    if triton_interpret():
        return block_d, [INTERPRET_CONFIG]
    return block_d, _config_table(backward, dtype)[block_d]


def _tuned_launch(name, kernel, grid_rows, n_heads_prog, args, flags, D, backward, dtype, sizes, device):
    """Launch `kernel` with the config measured fastest for this problem (kernels/_autotune.py): grid
    (cdiv(grid_rows, BLOCK_M or BLOCK_N), n_heads_prog), the rows' block being BLOCK_N for the dK/dV kernel."""
    from . import _autotune

    block_d, configs = _candidates(D, backward, dtype)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        rows_block = bn if name == "attn_bwd_dkdv" else bm
        kernel[(triton.cdiv(grid_rows, rows_block), n_heads_prog)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)

    key = (name, dtype, block_d, *flags.values(), *(triton.next_power_of_2(max(1, n)) for n in sizes))
    launch(_autotune.pick(key, configs, launch, device))


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


def _flags(causal, softcap, key_padding_mask, varlen, dropout_p):
    return dict(CAUSAL=causal, HAS_SOFTCAP=softcap is not None, HAS_KPM=key_padding_mask is not None,
                IS_VARLEN=varlen, DROPOUT=dropout_p > 0)


def forward(q, k, v, *, causal, scale, softcap, window, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, seed):
    """q (B, Hq, T, D), k/v (B, Hkv, S, D), unit stride in D; key_padding_mask (B, S) uint8 or None;
    cu_seqlens int32 (n + 1,) with B = 1. -> (o like q, lse (B, Hq, T) fp32)."""
    B, Hq, Hkv, T, S, D, varlen, nb, rows_q, rows_k, kpm, cu = _common(q, k, cu_seqlens, max_seqlen,
                                                                       key_padding_mask)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    left, right = window
    args = (q, k, v, o, lse, kpm, cu, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            lse.stride(0), lse.stride(1), key_padding_mask.stride(0) if key_padding_mask is not None else 0,
            T, S, Hq, Hq // Hkv, D, scale, softcap or 1.0, left, right, dropout_p, seed)
    flags = _flags(causal, softcap, key_padding_mask, varlen, dropout_p)
    _tuned_launch("attn_fwd", attn_fwd_kernel, rows_q, nb * Hq, args, flags, D, False, q.dtype,
                  (rows_q, rows_k, nb * Hq), q.device)
    return o, lse


def backward(do, q, k, v, o, lse, *, causal, scale, softcap, window, key_padding_mask, cu_seqlens, max_seqlen,
             dropout_p, seed):
    """-> (dq, dk, dv); Delta = rowsum(dO * O) in fp32."""
    B, Hq, Hkv, T, S, D, varlen, nb, rows_q, rows_k, kpm, cu = _common(q, k, cu_seqlens, max_seqlen, key_padding_mask)
    delta = (do.float() * o.float()).sum(-1)  # (B, Hq, T)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    left, right = window
    skpm = key_padding_mask.stride(0) if key_padding_mask is not None else 0
    flags = _flags(causal, softcap, key_padding_mask, varlen, dropout_p)
    scalars = (D, scale, softcap or 1.0, left, right, dropout_p, seed)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], lse.stride(0), lse.stride(1))
    sizes = (rows_q, rows_k, nb * Hq)
    _tuned_launch("attn_bwd_dkdv", attn_bwd_dkdv_kernel, rows_k, nb * Hkv,
                  (q, k, v, do, lse, delta, dk, dv, kpm, cu, *strides, *dk.stride()[:3], *dv.stride()[:3], skpm,
                   T, S, Hkv, Hq // Hkv, *scalars), flags, D, True, q.dtype, sizes, q.device)
    _tuned_launch("attn_bwd_dq", attn_bwd_dq_kernel, rows_q, nb * Hq,
                  (q, k, v, do, lse, delta, dq, kpm, cu, *strides, *dq.stride()[:3], skpm, T, S, Hq, Hq // Hkv,
                   *scalars), flags, D, True, q.dtype, sizes, q.device)
    return dq, dk, dv


@triton.jit
def attn_decode_kernel(Q, K, V, O_PART, LSE_PART, KPM,
                       sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sos, sob, soh, sot, sls, slb, slh, skpm,
                       T, S, Hkv, GROUP, D, split_len, scale, softcap, left, right,
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
        ok = _visible(i, offs_n, T, S, left, right, KPM, b.to(tl.int64) * skpm, CAUSAL, HAS_KPM)
        ok = ok & row_ok[:, None] & (offs_n[None, :] < hi)
        s = tl.where(ok, _scores(q, k, scale, softcap, HAS_SOFTCAP), -float("inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        v = tl.load(_rows(v_ptr, offs_n, svt, offs_d), mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, -float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    base = split.to(tl.int64) * sos + b.to(tl.int64) * sob
    tl.store(O_PART + base + h.to(tl.int64)[:, None] * soh + i[:, None] * sot + offs_d[None, :], o,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + split.to(tl.int64) * sls + b.to(tl.int64) * slb + h.to(tl.int64) * slh + i, lse, mask=row_ok)


DECODE_MAX_ROWS = 32  # GROUP * T query rows per program (Llama-3 70B: GROUP 8 x T up to 4)
DECODE_BLOCK_N = {torch.bfloat16: {32: 64, 64: 64, 128: 64, 256: 32},  # keys per tile, per padded head dim
                  torch.float32: {32: 64, 64: 32, 128: 32, 256: 16}}


def decode_eligible(q, k, dropout_p, cu_seqlens):
    """Flash-decoding applies to inference with few query rows per kv head against a longer KV cache."""
    group_rows = q.shape[1] // k.shape[1] * q.shape[2]
    return dropout_p == 0 and cu_seqlens is None and group_rows <= DECODE_MAX_ROWS and k.shape[2] >= 4 * q.shape[2]


def decode(q, k, v, *, causal, scale, softcap, window, key_padding_mask, n_splits=None):
    """Forward only: splits the keys, runs attn_decode_kernel, merges the splits by their log-sum-exp."""
    from fastnlg.backend import triton_interpret

    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_d = max(32, triton.next_power_of_2(D))
    table = DECODE_BLOCK_N[torch.float32 if q.dtype == torch.float32 else torch.bfloat16]
    block_n = INTERPRET_BLOCK if triton_interpret() else table[block_d]
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
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)
    lse = torch.logsumexp(lse_part, dim=0)  # (B, Hq, T); -inf where no split saw a key
    weight = torch.exp(lse_part - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    return (weight[..., None] * o_part).sum(0).to(q.dtype)


def _signature(kernel, dtype):
    """AOT signature: tensor pointers, strides (batch strides i64), sizes, scalars."""
    t = "*" + TRITON_DTYPE[dtype]
    names = kernel.arg_names
    sig = {}
    for name in names:
        if name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name == "CU":
            sig[name] = "*i32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = t
        elif name.startswith("s") and name not in ("scale", "softcap", "seed"):
            sig[name] = "i64" if name.endswith("b") else "i32"
        elif name in ("scale", "softcap", "dropout_p"):
            sig[name] = "fp32"
        elif name in ("CAUSAL", "HAS_SOFTCAP", "HAS_KPM", "IS_VARLEN", "DROPOUT", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def _specs():
    """Every (kernel, head-dim config, dtype table) with all features on: the most registers and the same
    tiles (shared memory) as the plain variant, which is left out to keep CI's compile time down."""
    specs = []
    flags = {"CAUSAL": True, "HAS_SOFTCAP": True, "HAS_KPM": True, "IS_VARLEN": True, "DROPOUT": True}
    for kernel, backward in ((attn_fwd_kernel, False), (attn_bwd_dkdv_kernel, True), (attn_bwd_dq_kernel, True)):
        for dtype in (torch.bfloat16, torch.float32):
            for block_d, configs in _config_table(backward, dtype).items():
                for bm, bn, warps, stages in configs:
                    specs.append({"kernel": kernel, "signature": _signature(kernel, dtype), "num_warps": warps,
                                  "num_stages": stages,
                                  "constexprs": {**flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d}})
    for dtype, table in DECODE_BLOCK_N.items():
        for block_d, block_n in table.items():
            sig = _signature(attn_decode_kernel, dtype)
            sig.update({"O_PART": "*fp32", "LSE_PART": "*fp32"})
            specs.append({"kernel": attn_decode_kernel, "signature": sig, "num_warps": 4, "num_stages": 2,
                          "constexprs": {"CAUSAL": True, "HAS_SOFTCAP": True, "HAS_KPM": True,
                                         "BLOCK_M": DECODE_MAX_ROWS, "BLOCK_N": block_n, "BLOCK_D": block_d}})
    return specs


AOT_SPECS = _specs()
