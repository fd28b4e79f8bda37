"""Per-token log-probabilities of hidden @ weight.T (the preference losses' primitive) vs eager (TRL's math on
materialised logits: log_softmax, gather), torch.compile of it, and TRL's own chunked kernel when installed.

Two heads: trainable (full fine-tuning: gradients to hidden and weight) and frozen (LoRA / QLoRA, the usual
preference run: the gradient to hidden only, where fastnlg keeps d logp / dh from the forward pass).
Sizes: quick = one small case per head; full on CPU = issue 28's CPU target, N=4096, V=32000, C=1024
(peak memory <= 1/5 of eager's, time no worse); full on CUDA = N=8192 (2 x 4096 tokens), V=128256, C=4096.

FLOPs: the logits matmul is 2 N C V; the backward's dh matmul 2 N C V more, and dW another 2 N C V.
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import fused_linear_logprobs

from .cases import compiled
from .harness import Bench, Case
from .peers import fused_linear_logprobs_peers


def eager(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


def cases(quick, device):
    sizes = [(1024, 32000, 256)] if quick else [(4096, 32000, 1024)] if device == "cpu" else [(8192, 128256, 4096)]
    return [Case(f"N={n},V={v},C={c},{head}", {"N": n, "V": v, "C": c, "frozen": head == "frozen-head"}, n)
            for n, v, c in sizes for head in ("trainable-head", "frozen-head")]


def make_inputs(p, device, dtype):
    return {"hidden": torch.randn(p["N"], p["C"], device=device, dtype=dtype, requires_grad=True),
            "weight": (torch.randn(p["V"], p["C"], device=device, dtype=dtype) / p["C"] ** 0.5)
            .requires_grad_(not p["frozen"]),
            "labels": torch.randint(0, p["V"], (p["N"],), device=device)}


def flops(p, mode):
    return (2 if mode == "fwd" else 4 if p["frozen"] else 6) * p["N"] * p["C"] * p["V"]


BENCH = Bench("fused_linear_logprobs", cases, make_inputs,
              {"fastnlg": fused_linear_logprobs, "eager": eager, "torch.compile": compiled(eager),
               **fused_linear_logprobs_peers()},
              flops=flops, modes=("fwd", "fwd+bwd"), x_label="tokens N")
