"""QLoRA / LoRA layer, forward and forward+backward: fastnlg.lora_linear over an NF4 base and over a dense
base, vs bitsandbytes Linear4bit + PEFT LoRA (when installed) and vs a dense layer + PEFT LoRA.
Llama projections 4096->4096, 4096->14336, 14336->4096; r 16 and 64; tokens 512-8k.

FLOPs: base 2 N in out (+ LoRA 2 N r (in + out)); backward: dx only for the base (frozen), plus the LoRA
terms, i.e. fwd+bwd = 2x base + 3x LoRA forward.
"""

import torch

from fastnlg.ops import lora_linear
from fastnlg.quant import quantize_nf4

from .harness import Bench, Case
from .peers import available, missing

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))


def cases(quick, device):
    if quick:
        return [Case("N=256,256->512,r=16", {"N": 256, "in": 256, "out": 512, "r": 16}, 256)]
    return [Case(f"N={n},{i}->{o},r={r}", {"N": n, "in": i, "out": o, "r": r}, n)
            for (i, o) in SHAPES for r in (16, 64) for n in (512, 2048, 8192)]


def make_inputs(p, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(p["out"], p["in"], generator=g) * p["in"] ** -0.5).to(device=device, dtype=dtype)
    A = (torch.randn(p["r"], p["in"], generator=g) * p["in"] ** -0.5).to(device=device, dtype=dtype)
    B = (torch.randn(p["out"], p["r"], generator=g) * 0.01).to(device=device, dtype=dtype)
    return {"x": torch.randn(p["N"], p["in"], device=device, dtype=dtype).requires_grad_(), "W": W,
            "W_nf4": quantize_nf4(W, 64, True), "A": A.requires_grad_(), "B": B.requires_grad_(), "scaling": 2.0}


def fastnlg_nf4(x, W, W_nf4, A, B, scaling):
    return lora_linear(x, W_nf4, A, B, scaling=scaling)


def fastnlg_dense(x, W, W_nf4, A, B, scaling):
    return lora_linear(x, W, A, B, scaling=scaling)


def eager_dense(x, W, W_nf4, A, B, scaling):
    """What PEFT runs over nn.Linear (lora_dropout=0): base + B(A(x)) * s as separate ops."""
    return torch.nn.functional.linear(x, W) + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * scaling


def eager_nf4(x, W, W_nf4, A, B, scaling):
    """The spec of the NF4 implementations: the same with W dequantised (exact values, in x's dtype)."""
    return eager_dense(x, W_nf4.dequantize(torch.float32).to(x.dtype), W_nf4, A, B, scaling)


def _bnb_peers():
    why = available("bitsandbytes")
    if why is not None:
        return {"bnb+peft": missing(why)}
    import bitsandbytes as bnb
    cache = {}

    def bnb_peft(x, W, W_nf4, A, B, scaling):
        key = W.data_ptr()
        if key not in cache:
            param = W_nf4.to_bnb()
            cache.clear()
            cache[key] = param
        param = cache[key]
        base = bnb.matmul_4bit(x, param.t(), quant_state=param.quant_state)
        return base + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * scaling
    return {"bnb+peft": bnb_peft}


def flops(p, mode):
    base = 2 * p["N"] * p["in"] * p["out"]
    lora = 2 * p["N"] * p["r"] * (p["in"] + p["out"])
    return base + lora if mode == "fwd" else 2 * base + 3 * lora


BENCH = Bench("lora_linear", cases, make_inputs,
              {"fastnlg": fastnlg_nf4, "fastnlg-dense": fastnlg_dense, "eager": eager_dense, **_bnb_peers()},
              flops=flops, x_label="tokens N", references={"fastnlg": eager_nf4, "bnb+peft": eager_nf4})
