"""Residual add + LayerNorm (BERT's sublayer output): fastnlg.ops.add_layer_norm vs eager
F.layer_norm(x + residual) vs torch.compile of the same.

Bytes moved: fwd reads x, residual, w, b and writes y, the sum (kept for the backward), mean, rstd; bwd reads
dy, the sum, w, mean, rstd and writes dx (the residual's gradient is the same tensor), dw, db.
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import add_layer_norm

from .cases import compiled, hidden_sweep
from .harness import Bench


def eager(x, r, w, b):
    return F.layer_norm(x + r, x.shape[-1:], w, b, 1e-5)


def make_inputs(p, device, dtype):
    return {"x": torch.randn(p["N"], p["C"], device=device, dtype=dtype, requires_grad=True),
            "r": torch.randn(p["N"], p["C"], device=device, dtype=dtype, requires_grad=True),
            "w": torch.randn(p["C"], device=device, dtype=dtype, requires_grad=True),
            "b": torch.randn(p["C"], device=device, dtype=dtype, requires_grad=True)}


def bytes_moved(p, dtype, mode):
    N, C, s = p["N"], p["C"], torch.finfo(dtype).bits // 8
    fwd = 4 * N * C * s + 2 * C * s + 8 * N
    return fwd if mode == "fwd" else fwd + 3 * N * C * s + C * s + 8 * N + 8 * C


BENCH = Bench("add_layer_norm", hidden_sweep, make_inputs,
              {"fastnlg": lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5), "eager": eager,
               "torch.compile": compiled(eager)},
              bytes_moved=bytes_moved)
