"""LayerNorm: fastnlg vs eager F.layer_norm vs torch.compile.

Bytes moved: fwd reads x, w, b and writes y, mean, rstd; bwd reads dy, x, w, mean, rstd, writes dx, dw, db.
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import layer_norm

from .cases import compiled, hidden_sweep
from .harness import Bench


def eager(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def make_inputs(p, device, dtype):
    return {"x": torch.randn(p["N"], p["C"], device=device, dtype=dtype, requires_grad=True),
            "w": torch.randn(p["C"], device=device, dtype=dtype, requires_grad=True),
            "b": torch.randn(p["C"], device=device, dtype=dtype, requires_grad=True)}


def bytes_moved(p, dtype, mode):
    N, C, s = p["N"], p["C"], torch.finfo(dtype).bits // 8
    fwd = 2 * N * C * s + 2 * C * s + 8 * N
    return fwd if mode == "fwd" else fwd + 3 * N * C * s + C * s + 8 * N + 8 * C


BENCH = Bench("layer_norm", hidden_sweep, make_inputs,
              {"fastnlg": lambda x, w, b: layer_norm(x, w, b, 1e-5), "eager": eager, "torch.compile": compiled(eager)},
              bytes_moved=bytes_moved)
