"""RoPE: fastnlg vs HF's apply_rotary_pos_emb (eager) vs torch.compile of it.

Bytes moved (s = element size): fwd reads q, k, cos, sin and writes q, k:
2 (B Hq T D + B Hk T D) s + 2 B T D s; bwd the same again.
"""
import torch

from fastnlg.ops import apply_rope

from .cases import compiled
from .harness import Bench, Case


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def eager(q, k, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def cases(quick, device):
    if quick:
        return [Case("B=1,T=256,Hq=8,Hk=2,D=64", {"B": 1, "T": 256, "Hq": 8, "Hk": 2, "D": 64}, 256)]
    return [Case(f"B=1,T={t},Hq=32,Hk=8,D=128", {"B": 1, "T": t, "Hq": 32, "Hk": 8, "D": 128}, t)
            for t in (1024, 4096, 16384)]


def make_inputs(p, device, dtype):
    B, T, D = p["B"], p["T"], p["D"]
    ang = torch.rand(B, T, D, device=device) * 6.28
    return {"q": torch.randn(B, T, p["Hq"], D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(),
            "k": torch.randn(B, T, p["Hk"], D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(),
            "cos": ang.cos().to(dtype), "sin": ang.sin().to(dtype)}


def bytes_moved(p, dtype, mode):
    B, T, D, s = p["B"], p["T"], p["D"], torch.finfo(dtype).bits // 8
    one = 2 * B * T * D * (p["Hq"] + p["Hk"]) * s + 2 * B * T * D * s
    return one if mode == "fwd" else 2 * one


BENCH = Bench("rope", cases, make_inputs, {"fastnlg": apply_rope, "eager": eager, "torch.compile": compiled(eager)},
              bytes_moved=bytes_moved, x_label="tokens T")
