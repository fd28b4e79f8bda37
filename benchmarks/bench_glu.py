"""SwiGLU and GeGLU (tanh GELU, Gemma's): fastnlg vs eager act(gate) * up vs torch.compile.

Bytes moved (n = N x I values, s = element size): fwd reads gate, up, writes y: 3 n s;
bwd reads dy, gate, up, writes dgate, dup: 5 n s.
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import geglu, swiglu

from .cases import compiled
from .harness import Bench, Case


def eager(gate, up):
    return F.silu(gate) * up


def eager_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def cases(quick, device):
    if quick:
        return [Case(f"N=256,I={i}", {"N": 256, "I": i}, i) for i in (2816, 11008)]
    return [Case(f"N={n},I={i}", {"N": n, "I": i}, i) for n in (4096, 16384) for i in (2816, 5632, 11008, 14336)]


def make_inputs(p, device, dtype):
    return {k: torch.randn(p["N"], p["I"], device=device, dtype=dtype, requires_grad=True) for k in ("gate", "up")}


def bytes_moved(p, dtype, mode):
    n, s = p["N"] * p["I"], torch.finfo(dtype).bits // 8
    return 3 * n * s if mode == "fwd" else 8 * n * s


BENCH = Bench("swiglu", cases, make_inputs, {"fastnlg": swiglu, "eager": eager, "torch.compile": compiled(eager)},
              bytes_moved=bytes_moved, x_label="intermediate size I")
GEGLU = Bench("geglu", cases, make_inputs, {"fastnlg": geglu, "eager": eager_geglu,
                                            "torch.compile": compiled(eager_geglu)},
              bytes_moved=bytes_moved, x_label="intermediate size I")
