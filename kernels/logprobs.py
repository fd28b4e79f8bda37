"""Per-token log-probabilities and entropies over rows of logits, with the gradient written in place.

For row i with raw logits x (V,), label y, temperature T, row gradients a_i (of logp) and b_i (of H):
    z = x / T;  m = max_j z_j;  s = sum_j e^{z_j - m};  t = sum_j e^{z_j - m} (z_j - m)
    lse = m + log s;  logp_i = z_y - lse;  H_i = -sum_j p_j log p_j = log s - t / s;  p = softmax(z)
    dx_j = (a_i ([j == y] - p_j) - b_i p_j (z_j - E)) / T,   E = sum_j p_j z_j, so z_j - E = (z_j - m) - t / s
    X[i, :] <- dx                                     (when COMPUTE_GRAD)
Logits of -inf have p_j = 0 and add nothing to H or dx. Rows with label == ignore_index get 0 and grad 0.
Tiling: one program per row; pass 1 streams the row in BLOCK_V tiles with an online max / sum-exp / sum of
e (z - m) (fp32; on a new max m' both sums rescale by e^{m - m'}, t also shifts by (m - m') s); pass 2
re-reads the tiles and writes the gradient.
"""
import torch
import triton
import triton.language as tl

from ._launch import AOT_DTYPES, TRITON_DTYPE

BLOCK_V, NUM_WARPS = 4096, 8


@triton.jit
def logprobs_kernel(X, LABELS, LOGP, ENT, GA, GB, stride_x, V, ignore_index, inv_t,
                    HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        tl.store(LOGP + row, 0.0)
        tl.store(ENT + row, 0.0)
        if HAS_GA or HAS_GB:
            for v0 in range(0, V, BLOCK_V):
                tl.store(x_row + v0 + cols, tl.zeros([BLOCK_V], dtype=X.dtype.element_ty), mask=v0 + cols < V)
    else:
        m = -float("inf")
        s = 0.0
        t = 0.0
        for v0 in range(0, V, BLOCK_V):  # pass 1: online max, sum of e, sum of e (z - m)
            mask = v0 + cols < V
            z = tl.load(x_row + v0 + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a tile of -inf logits: no inf - inf
            alpha = tl.exp(m - m_safe)
            shift = tl.where(s > 0.0, m - m_safe, 0.0) * s  # (s == 0 while m is -inf: no 0 * inf)
            d = z - m_safe
            e = tl.exp(d)
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)  # (no 0 * -inf)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        ls = tl.log(s)
        em = t / s  # E - m
        zy = tl.load(x_row + y).to(tl.float32) * inv_t
        tl.store(LOGP + row, zy - m - ls)
        tl.store(ENT + row, ls - em)
        if HAS_GA or HAS_GB:
            a = 0.0
            b = 0.0
            if HAS_GA:
                a = tl.load(GA + row)
            if HAS_GB:
                b = tl.load(GB + row)
            for v0 in range(0, V, BLOCK_V):  # pass 2: gradient in place
                mask = v0 + cols < V
                d = tl.load(x_row + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - m
                p = tl.exp(d) / s
                g = -p * (a + b * (tl.where(p > 0.0, d, 0.0) - em))
                g = tl.where(v0 + cols == y, g + a, g) * inv_t
                tl.store(x_row + v0 + cols, g.to(X.dtype.element_ty), mask=mask)


def forward(logits: torch.Tensor, labels: torch.Tensor, inv_t: float, ignore_index: int,
            grad_logp: torch.Tensor | None, grad_ent: torch.Tensor | None):
    """logits (n, V) unit column stride; labels (n,) int64; grad_logp / grad_ent (n,) fp32 or None: with
    either, the gradient overwrites logits. -> (logp (n,) fp32, entropy (n,) fp32)."""
    n, V = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        logprobs_kernel[(n,)](logits, labels, logp, ent, grad_logp if grad_logp is not None else logp,
                              grad_ent if grad_ent is not None else ent, logits.stride(0), V, ignore_index, inv_t,
                              HAS_GA=grad_logp is not None, HAS_GB=grad_ent is not None, BLOCK_V=BLOCK_V,
                              num_warps=NUM_WARPS)
    return logp, ent


def _specs():
    specs = []
    for dtype in AOT_DTYPES:
        sig = {"X": "*" + TRITON_DTYPE[dtype], "LABELS": "*i64", "LOGP": "*fp32", "ENT": "*fp32", "GA": "*fp32",
               "GB": "*fp32", "stride_x": "i64", "V": "i32", "ignore_index": "i64", "inv_t": "fp32",
               "HAS_GA": "constexpr", "HAS_GB": "constexpr", "BLOCK_V": "constexpr"}
        for ga in (False, True):
            for gb in (False, True):
                specs.append({"kernel": logprobs_kernel, "signature": sig, "num_warps": NUM_WARPS,
                              "constexprs": {"HAS_GA": ga, "HAS_GB": gb, "BLOCK_V": BLOCK_V}})
    return specs


AOT_SPECS = _specs()
