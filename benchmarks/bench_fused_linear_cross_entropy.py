"""Fused linear + cross-entropy vs eager F.linear + F.cross_entropy vs torch.compile of it, and the peers that
are installed: torch's own chunked F.linear_cross_entropy (torch >= 2.13), Liger, Apple's cut-cross-entropy.

Sizes: quick = one small case; full on CUDA = N 1k-32k x (V, C) in {(32000, 4096), (128256, 4096),
(256000, 2304), (32000, 2048), (128256, 8192)}; full on CPU = the CPU target case of issue 4,
N=8192, V=32000, C=1024 (peak memory <= 1/5 of eager's, time <= 1.5x eager's).

FLOPs: the logits matmul is 2 N C V; backward adds dh and dW matmuls (4 N C V). fwd+bwd = 6 N C V
(fastnlg computes the gradients inside the forward pass for scalar reductions, so its "fwd" row already
includes them: compare fwd+bwd rows across implementations).
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import fused_linear_cross_entropy

from .cases import compiled
from .harness import Bench, Case
from .peers import fused_linear_cross_entropy_peers


def eager(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def cases(quick, device):
    if quick:
        return [Case("N=1024,V=32000,C=256", {"N": 1024, "V": 32000, "C": 256}, 1024)]
    if device == "cpu":
        return [Case("N=8192,V=32000,C=1024", {"N": 8192, "V": 32000, "C": 1024}, 8192)]
    return [Case(f"N={n},V={v},C={c}", {"N": n, "V": v, "C": c}, n)
            for v, c in ((32000, 4096), (128256, 4096), (256000, 2304), (32000, 2048), (128256, 8192))
            for n in (1024, 4096, 16384, 32768)]


def make_inputs(p, device, dtype):
    return {"hidden": torch.randn(p["N"], p["C"], device=device, dtype=dtype, requires_grad=True),
            "weight": (torch.randn(p["V"], p["C"], device=device, dtype=dtype) / p["C"] ** 0.5).requires_grad_(),
            "labels": torch.randint(0, p["V"], (p["N"],), device=device)}


def flops(p, mode):
    return (2 if mode == "fwd" else 6) * p["N"] * p["C"] * p["V"]


BENCH = Bench("fused_linear_cross_entropy", cases, make_inputs,
              {"fastnlg": fused_linear_cross_entropy, "eager": eager, "torch.compile": compiled(eager),
               **fused_linear_cross_entropy_peers()},
              flops=flops, modes=("fwd+bwd",), x_label="tokens N")
