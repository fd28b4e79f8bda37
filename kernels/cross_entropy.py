"""Cross-entropy over rows of logits, with the gradient written in place of the logits.

For row i with raw logits x (V,), label y, smoothing eps, softcap c, z-loss weight zl, row scale s_i,
class weights w (all 1 without HAS_WEIGHT), W = sum_j w_j:
    z = c * tanh(x / c)  (or z = x without softcap);  lse = log sum_j exp(z_j)
    loss_i = (1 - eps) w_y (lse - z_y) + eps / V (W lse - sum_j w_j z_j) + zl * lse^2
    dloss/dz_j = p_j ((1 - eps) w_y + eps W / V + 2 zl lse) - (1 - eps) w_y [j == y] - eps w_j / V,   p = softmax(z)
    dloss/dx_j = dloss/dz_j * (1 - tanh^2(x_j / c))   (softcap)
    X[i, :] <- s_i * dloss/dx                          (when COMPUTE_GRAD)
Tiling: one program per row; pass 1 streams the row in BLOCK_V tiles with an online max / sum-exp (fp32);
pass 2 re-reads the tiles and writes the gradient. Rows with label == ignore_index get loss 0, grad 0.
"""
import torch
import triton
import triton.language as tl

from ._launch import AOT_DTYPES, TRITON_DTYPE

BLOCK_V, NUM_WARPS = 4096, 8


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(x / softcap), tanh written as 2 sigmoid(2u) - 1 (single return: the
    compiler rejects returns inside constexpr branches)."""
    z = x
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    return z


@triton.jit
def cross_entropy_kernel(X, LABELS, LOSS, LSE, SCALE, CW, stride_x, V, ignore_index, eps, softcap, z_loss, w_sum,
                         HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                tl.store(x_row + v0 + cols, tl.zeros([BLOCK_V], dtype=X.dtype.element_ty), mask=v0 + cols < V)
    else:
        m = -float("inf")
        d = 0.0
        zsum = 0.0
        for v0 in range(0, V, BLOCK_V):  # pass 1: online max / sum of exp, and sum of z for smoothing
            mask = v0 + cols < V
            x = tl.load(x_row + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            z = _capped(x, softcap, HAS_SOFTCAP)
            if HAS_WEIGHT:  # sum_j w_j z_j
                zsum += tl.sum(tl.where(mask, z * tl.load(CW + v0 + cols, mask=mask, other=0.0), 0.0), axis=0)
            else:
                zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a tile of -inf logits: no inf - inf
            d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
            m = m_new
        lse = m + tl.log(d)
        zy = _capped(tl.load(x_row + y).to(tl.float32), softcap, HAS_SOFTCAP)
        wy = 1.0
        W = V * 1.0
        if HAS_WEIGHT:
            wy = tl.load(CW + y).to(tl.float32)
            W = w_sum
        smooth = tl.where(eps > 0.0, eps / V * (W * lse - zsum), 0.0)  # no 0 * inf from -inf logits
        loss = (1.0 - eps) * wy * (lse - zy) + smooth + z_loss * lse * lse
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)
        if COMPUTE_GRAD:
            s = tl.load(SCALE + row)
            for v0 in range(0, V, BLOCK_V):  # pass 2: gradient in place
                mask = v0 + cols < V
                x = tl.load(x_row + v0 + cols, mask=mask, other=0.0).to(tl.float32)
                z = _capped(x, softcap, HAS_SOFTCAP)
                g = tl.exp(z - lse) * ((1.0 - eps) * wy + eps * W / V + 2.0 * z_loss * lse)
                if HAS_WEIGHT:
                    g -= eps / V * tl.load(CW + v0 + cols, mask=mask, other=0.0)
                else:
                    g -= eps / V
                g = tl.where(v0 + cols == y, g - (1.0 - eps) * wy, g)
                if HAS_SOFTCAP:
                    t = z / softcap
                    g = g * (1.0 - t * t)  # d(softcap tanh(x / softcap))/dx
                tl.store(x_row + v0 + cols, (s * g).to(X.dtype.element_ty), mask=mask)


def forward(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, ignore_index: int, eps: float,
            softcap: float | None, z_loss: float, class_weight: torch.Tensor | None = None, weight_sum: float = 0.0):
    """logits (n, V) unit column stride; with `scale` (n,) fp32 the gradient overwrites logits; class_weight
    (V,) fp32 contiguous with its sum `weight_sum`. -> (loss (n,) fp32, lse (n,) fp32)."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        cross_entropy_kernel[(n,)](logits, labels, loss, lse, scale if scale is not None else loss,
                                   class_weight if class_weight is not None else loss, logits.stride(0), V,
                                   ignore_index, eps, softcap or 1.0, z_loss, weight_sum,
                                   HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=scale is not None,
                                   HAS_WEIGHT=class_weight is not None, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return loss, lse


def _specs():
    specs = []
    for dtype in AOT_DTYPES:
        sig = {"X": "*" + TRITON_DTYPE[dtype], "LABELS": "*i64", "LOSS": "*fp32", "LSE": "*fp32", "SCALE": "*fp32",
               "CW": "*fp32", "stride_x": "i64", "V": "i32", "ignore_index": "i64", "eps": "fp32", "softcap": "fp32",
               "z_loss": "fp32", "w_sum": "fp32", "HAS_SOFTCAP": "constexpr", "COMPUTE_GRAD": "constexpr",
               "HAS_WEIGHT": "constexpr", "BLOCK_V": "constexpr"}
        for softcap in (False, True):
            for grad in (False, True):
                for weight in (False, True):
                    specs.append({"kernel": cross_entropy_kernel, "signature": sig, "num_warps": NUM_WARPS,
                                  "constexprs": {"HAS_SOFTCAP": softcap, "COMPUTE_GRAD": grad, "HAS_WEIGHT": weight,
                                                 "BLOCK_V": BLOCK_V}})
    return specs


AOT_SPECS = _specs()
