"""Cross-entropy on given logits (N, V) vs eager F.cross_entropy (fp32 upcast, as HF does) vs torch.compile
vs Liger's kernel when installed.

Bytes: forward reads the logits once (N V s, s = element size); fwd+bwd also writes dlogits (2 N V s).
(fastnlg computes the gradient inside the forward pass, so compare fwd+bwd rows.)
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import cross_entropy

from .cases import compiled
from .harness import Bench, Case
from .peers import cross_entropy_peers


def eager(logits, labels):
    return F.cross_entropy(logits.float(), labels)


def cases(quick, device):
    if quick:
        return [Case("N=1024,V=32000", {"N": 1024, "V": 32000}, 1024)]
    return [Case(f"N={n},V={v}", {"N": n, "V": v}, n) for v in (32000, 128256, 256000) for n in (1024, 4096, 16384)]


def make_inputs(p, device, dtype):
    return {"logits": (torch.randn(p["N"], p["V"], device=device) * 2).to(dtype).requires_grad_(),
            "labels": torch.randint(0, p["V"], (p["N"],), device=device)}


def bytes_moved(p, dtype, mode):
    size = torch.tensor([], dtype=dtype).element_size()
    return (1 if mode == "fwd" else 2) * p["N"] * p["V"] * size


BENCH = Bench("cross_entropy", cases, make_inputs,
              {"fastnlg": cross_entropy, "eager": eager, "torch.compile": compiled(eager), **cross_entropy_peers()},
              bytes_moved=bytes_moved, modes=("fwd+bwd",), x_label="tokens N")
