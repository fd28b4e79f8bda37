"""Rotary position embedding, Hugging Face `apply_rotary_pos_emb` semantics (rotate_half), fwd and bwd.

q (B, Hq, T, D), k (B, Hk, T, D) with any strides but unit stride on D; cos, sin (B, T, D) (stride 0 on B
when shared). With h = D / 2 and c, s the cos/sin row at (b, t):
    forward   o[j] = x[j] c[j] - x[j+h] s[j],        o[j+h] = x[j+h] c[j+h] + x[j] s[j+h]       (j < h)
    backward  dx[j] = d[j] c[j] + d[j+h] s[j+h],     dx[j+h] = d[j+h] c[j+h] - d[j] s[j]
(the backward is the transpose of the forward's 2x2 rotation per pair).
Tiling: one program per (b, t); cos/sin loaded once and applied to all heads of q and k, BLOCK_H heads
at a time; a (BLOCK_H, BLOCK_D2) tile holds the two halves of BLOCK_H head vectors.
"""
import torch
import triton
import triton.language as tl

from ._launch import AOT_DTYPES, TRITON_DTYPE, next_pow2

BLOCK_H = 8


@triton.jit
def _rotate_heads(X, O, b, t, H, sx_b, sx_h, sx_t, so_b, so_h, so_t, c1, c2, s1, s2, half,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
    j = tl.arange(0, BLOCK_D2)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < H) & (j < half)
        x_ptr = X + b * sx_b + h * sx_h + t * sx_t + j
        o_ptr = O + b * so_b + h * so_h + t * so_t + j
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)         # (BLOCK_H, BLOCK_D2)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(o_ptr, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(Q, K, QO, KO, COS, SIN, T, Hq, Hk, half,
                sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_b, sc_t,
                BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    j = tl.arange(0, BLOCK_D2)
    jm = j < half
    base = b * sc_b + t * sc_t
    c1 = tl.load(COS + base + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + base + half + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + base + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + base + half + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, b, t, Hq, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, c1, c2, s1, s2, half, BACKWARD, BLOCK_H, BLOCK_D2)
    _rotate_heads(K, KO, b, t, Hk, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, c1, c2, s1, s2, half, BACKWARD, BLOCK_H, BLOCK_D2)


def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    """q, k with unit stride on D; cos, sin (B, T, D) (expanded views allowed) -> rotated (q, k)."""
    B, Hq, T, D = q.shape
    qo, ko = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))  # contiguous, as every backend
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    block_d2 = max(4, next_pow2(D // 2))
    rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, T, Hq, k.shape[1], D // 2,
                          *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
                          cos.stride(0), cos.stride(1),
                          BACKWARD=backward, BLOCK_H=BLOCK_H, BLOCK_D2=block_d2, num_warps=4)
    return qo, ko


def _specs():
    specs = []
    ints = ["T", "Hq", "Hk", "half", "sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t", "sqo_b", "sqo_h", "sqo_t",
            "sko_b", "sko_h", "sko_t", "sc_b", "sc_t"]
    for dtype in AOT_DTYPES:
        t = "*" + TRITON_DTYPE[dtype]
        sig = {"Q": t, "K": t, "QO": t, "KO": t, "COS": t, "SIN": t, **{n: "i64" for n in ints},
               "BACKWARD": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D2": "constexpr"}
        for block_d2 in (4, 8, 16, 32, 64, 128):  # head dims 8 .. 256
            for bwd in (False, True):
                specs.append({"kernel": rope_kernel, "signature": sig, "num_warps": 4,
                              "constexprs": {"BACKWARD": bwd, "BLOCK_H": BLOCK_H, "BLOCK_D2": block_d2}})
    return specs


AOT_SPECS = _specs()
