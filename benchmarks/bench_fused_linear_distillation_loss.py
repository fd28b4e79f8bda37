"""Distillation loss from the two models' hidden states and heads (forward KL, the GKD default's limit, and JSD)
vs eager (TRL's generalized_jsd_loss math on both models' materialised logits) and torch.compile of it.

Sizes: quick = one small case; full on CPU = issue 28's CPU target, N=4096, V=32000, C=1024 (student and
teacher alike; peak memory <= 1/5 of eager's, time no worse); full on CUDA = N=8192, V=128256, C=4096.
FLOPs: the teacher's logits 2 N C V, the student's 2 N C V forward and 4 N C V backward.
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import fused_linear_distillation_loss

from .cases import compiled
from .harness import Bench, Case


def eager(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss="forward_kl"):
    ls = F.linear(student_hidden, student_weight).float().log_softmax(-1)
    with torch.no_grad():
        lt = F.linear(teacher_hidden, teacher_weight).float().log_softmax(-1)
    if loss == "forward_kl":
        div = F.kl_div(ls, lt, reduction="none", log_target=True)
    else:  # jsd, beta 0.5
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-0.5)), lt + torch.log(torch.tensor(0.5))]), 0)
        div = 0.5 * F.kl_div(lm, lt, reduction="none", log_target=True) + \
            0.5 * F.kl_div(lm, ls, reduction="none", log_target=True)
    mask = labels != -100
    return div[mask].sum() / mask.sum().clamp(min=1)


def fastnlg(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss="forward_kl"):
    return fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                          loss=loss)


def cases(quick, device):
    sizes = [(1024, 32000, 256)] if quick else [(4096, 32000, 1024)] if device == "cpu" else [(8192, 128256, 4096)]
    return [Case(f"N={n},V={v},C={c},{loss}", {"N": n, "V": v, "C": c, "loss": loss}, n)
            for n, v, c in sizes for loss in ("forward_kl", "jsd")]


def make_inputs(p, device, dtype):
    N, V, C = p["N"], p["V"], p["C"]
    return {"student_hidden": torch.randn(N, C, device=device, dtype=dtype, requires_grad=True),
            "student_weight": (torch.randn(V, C, device=device, dtype=dtype) / C ** 0.5).requires_grad_(),
            "teacher_hidden": torch.randn(N, C, device=device, dtype=dtype),
            "teacher_weight": torch.randn(V, C, device=device, dtype=dtype) / C ** 0.5,
            "labels": torch.randint(0, V, (N,), device=device), "loss": p["loss"]}


def flops(p, mode):
    return (4 if mode == "fwd" else 8) * p["N"] * p["C"] * p["V"]


BENCH = Bench("fused_linear_distillation_loss", cases, make_inputs,
              {"fastnlg": fastnlg, "eager": eager, "torch.compile": compiled(eager)},
              flops=flops, modes=("fwd+bwd",), x_label="tokens N")
