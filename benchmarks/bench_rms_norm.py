"""RMSNorm: fastnlg vs eager PyTorch (HF LlamaRMSNorm math) vs torch.compile of it.

Bytes moved (s = element size; partial dW rows are G x C fp32, counted as C since G << N):
  fwd:      read x (N C s) + w (C s), write y (N C s) + rstd (4 N)
  fwd+bwd:  fwd + read dy, x (2 N C s) + w + rstd, write dx (N C s) + dw (4 C)
"""
import torch

from fastnlg.ops import rms_norm

from .cases import compiled, hidden_sweep
from .harness import Bench


def eager(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def make_inputs(p, device, dtype):
    return {"x": torch.randn(p["N"], p["C"], device=device, dtype=dtype, requires_grad=True),
            "w": torch.randn(p["C"], device=device, dtype=dtype, requires_grad=True)}


def bytes_moved(p, dtype, mode):
    N, C, s = p["N"], p["C"], torch.finfo(dtype).bits // 8
    fwd = 2 * N * C * s + C * s + 4 * N
    return fwd if mode == "fwd" else fwd + 3 * N * C * s + C * s + 4 * N + 4 * C


BENCH = Bench("rms_norm", hidden_sweep, make_inputs,
              {"fastnlg": lambda x, w: rms_norm(x, w, 1e-6), "eager": eager, "torch.compile": compiled(eager)},
              bytes_moved=bytes_moved)
