"""GELU with a fused bias (GPT-2's MLP activation after c_fc): fastnlg vs eager (the bias add, then
transformers' gelu_new written out in torch ops, as GPT-2 runs it) vs eager F.gelu(x + bias) vs
torch.compile of the gelu_new form.

Bytes moved (n = N x I values, s = element size): fwd reads x and b, writes y: 2 n s (+ I s);
fwd+bwd adds: read dy, x (and b), write dx: 3 n s (+ db, I x 4 bytes).
"""
import math

import torch
import torch.nn.functional as F

from fastnlg.ops import gelu

from .cases import compiled
from .harness import Bench, Case


def eager_gelu_new(x, bias):
    """transformers' NewGELUActivation (GPT-2's gelu_new) on x + bias."""
    z = x + bias
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))


def eager_f_gelu(x, bias):
    return F.gelu(x + bias, approximate="tanh")


def cases(quick, device):
    if quick:
        return [Case(f"N=256,I={i}", {"N": 256, "I": i}, i) for i in (3072, 6400)]
    return [Case(f"N={n},I={i}", {"N": n, "I": i}, i) for n in (4096, 16384) for i in (3072, 4096, 6400)]


def make_inputs(p, device, dtype):
    return {"x": torch.randn(p["N"], p["I"], device=device, dtype=dtype, requires_grad=True),
            "bias": torch.randn(p["I"], device=device, dtype=dtype, requires_grad=True)}


def bytes_moved(p, dtype, mode):
    n, i, s = p["N"] * p["I"], p["I"], torch.finfo(dtype).bits // 8
    return 2 * n * s + i * s if mode == "fwd" else 5 * n * s + 2 * i * s + 4 * i


BENCH = Bench("gelu", cases, make_inputs, {"fastnlg": gelu, "eager": eager_gelu_new,
                                           "eager F.gelu": eager_f_gelu,
                                           "torch.compile": compiled(eager_gelu_new)},
              bytes_moved=bytes_moved, x_label="intermediate size I")
