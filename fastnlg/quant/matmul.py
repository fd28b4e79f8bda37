"""Products with a frozen NF4 weight W (out, in) that never dequantise it whole, one table per product and
backend (the caller picks the backend: ops/lora_linear.py):
    nt: y = x2 W^T (+ b) (+ s u B^T, the LoRA term added into the same y)       x2 (N, in)  -> (N, out)
    nn: dx = dy2 W                                                             dy2 (N, out) -> (N, in)
Triton (kernels/nf4_matmul.py) dequantises tile by tile inside the matmul and adds the LoRA term in its
epilogue; torch (CPU) dequantises blocks of output rows of at most DEQUANT_CHUNK_BYTES through the NF4
dequantise backend (C++ on CPU) and multiplies them."""
from __future__ import annotations

import torch

from ._backends import dequantize_raw
from .nf4_reference import NF4_CODE, on_device

DEQUANT_CHUNK_BYTES = 64 * 2**20


def _dequant_rows(w, absmax, r0: int, r1: int, dtype) -> torch.Tensor:
    """Rows [r0, r1) of `w` (out, in) with its fp32 absmax, dequantised on the whole quantisation blocks that
    cover them (rows need not start on a block; block starts are even, so bytes split cleanly)."""
    cols, bs, n = w.shape[1], w.blocksize, w.shape[0] * w.shape[1]
    e0, e1 = r0 * cols, r1 * cols
    b0, b1 = e0 // bs, -(-e1 // bs)  # the blocks elements [e0, e1) lie in
    f0, f1 = b0 * bs, min(n, b1 * bs)
    part = dequantize_raw(w.packed[f0 // 2: f1 // 2], absmax[b0:b1], (f1 - f0,), dtype, bs)
    return part[e0 - f0: e1 - f0].reshape(r1 - r0, cols)


def _row_chunks(w, dtype):
    """Row blocks of at most DEQUANT_CHUNK_BYTES, with the fp32 absmax decoded once."""
    rows, cols = w.shape
    per = max(1, DEQUANT_CHUNK_BYTES // max(1, cols * (torch.finfo(dtype).bits // 8 + 16)))
    absmax = w.absmax_fp32().float()
    return [(absmax, r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]


def _nt_torch(x2, w, bias, u=None, lora_B=None, scaling=1.0):
    y = torch.empty(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device)
    for absmax, r0, r1 in _row_chunks(w, x2.dtype):
        torch.matmul(x2, _dequant_rows(w, absmax, r0, r1, x2.dtype).t(), out=y[:, r0:r1])
    if bias is not None:
        y += bias
    return y if u is None else y.addmm_(u, lora_B.t(), alpha=scaling)


def _nn_torch(dy2, w):
    dx = torch.zeros(dy2.shape[0], w.shape[1], dtype=dy2.dtype, device=dy2.device)
    for absmax, r0, r1 in _row_chunks(w, dy2.dtype):
        dx.addmm_(dy2[:, r0:r1], _dequant_rows(w, absmax, r0, r1, dy2.dtype))
    return dx


def _tables(w):
    """What the Triton kernels read: packed bytes, fp32 absmax and the NF4 code, on w's device."""
    return w.packed.contiguous(), w.absmax_fp32().float().contiguous(), on_device(NF4_CODE, w.device)


def _nt_triton(x2, w, bias, u=None, lora_B=None, scaling=1.0):
    from fastnlg.kernels import nf4_matmul as k

    tables = _tables(w)
    if u is None or k.epilogue_fits(u.shape[1], x2.dtype, x2.device):
        return k.matmul_nt(x2, *tables, w.shape, w.blocksize, bias, lora_u=u, lora_B=lora_B, scaling=scaling)
    return k.matmul_nt(x2, *tables, w.shape, w.blocksize, bias).addmm_(u, lora_B.t(), alpha=scaling)


def _nn_triton(dy2, w):
    from fastnlg.kernels import nf4_matmul as k

    return k.matmul_nn(dy2, *_tables(w), w.shape, w.blocksize)


MATMUL_NT = {"torch": _nt_torch, "triton": _nt_triton}
MATMUL_NN = {"torch": _nn_torch, "triton": _nn_triton}
