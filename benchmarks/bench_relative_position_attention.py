"""T5's relative-position-bias attention, forward and forward+backward (the bias table's gradient included):
fastnlg.relative_position_attention (the bias from the bucket table inside the kernel) vs eager T5 (Transformers'
compute_bias, then scores + bias, fp32 softmax) and PyTorch SDPA under the materialised bias as its float mask
(Transformers' SDPA path for T5). T5 does not scale the scores; 32 buckets, max distance 128, bidirectional
(the encoder) or causal (the decoder).

FLOPs: flash_attention's convention (bench_attention.py): forward 4 B H T S D, halved when causal; fwd+bwd 3.5x.
"""
import torch
import torch.nn.functional as F

from fastnlg.ops import relative_position_attention
from fastnlg.ops.relative_position_attention import relative_position_bias

from .harness import Bench, Case

BUCKETS, MAX_DISTANCE = 32, 128


def _bias(table, T, S, causal):
    return relative_position_bias(table, T, S, bidirectional=not causal, num_buckets=BUCKETS,
                                  max_distance=MAX_DISTANCE)


def eager(q, k, v, table, causal):
    T, S = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) + _bias(table, T, S, causal).to(q.dtype)
    if causal:
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1), -float("inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def sdpa(q, k, v, table, causal):
    T, S = q.shape[2], k.shape[2]
    bias = _bias(table, T, S, causal).to(q.dtype)
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        bias = torch.where(allowed, bias, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def fastnlg(q, k, v, table, causal):
    return relative_position_attention(q, k, v, table, bidirectional=not causal, num_buckets=BUCKETS,
                                       max_distance=MAX_DISTANCE, causal=causal)


def cases(quick, device):
    if quick:
        return [Case("B=1,H=4,T=256,D=64,encoder", {"B": 1, "H": 4, "T": 256, "D": 64, "causal": False}, 256)]
    out = []
    for causal in (False, True):
        for T in (512, 1024, 2048, 4096):
            p = {"B": max(1, 8192 // T), "H": 8, "T": T, "D": 64, "causal": causal}
            out.append(Case(f"B={p['B']},H=8,T={T},D=64," + ("decoder" if causal else "encoder"), p, T))
    return out


def make_inputs(p, device, dtype):
    B, H, T, D = p["B"], p["H"], p["T"], p["D"]
    mk = lambda: (torch.randn(B, H, T, D, device=device, dtype=dtype) * D ** -0.25).requires_grad_()  # noqa: E731
    table = torch.randn(BUCKETS, H, device=device, dtype=torch.float32).requires_grad_()
    return {"q": mk(), "k": mk(), "v": mk(), "table": table, "causal": p["causal"]}


def flops(p, mode):
    fwd = 4 * p["B"] * p["H"] * p["T"] * p["T"] * p["D"] / (2 if p["causal"] else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


BENCH = Bench("relative_position_attention", cases, make_inputs,
              {"fastnlg": fastnlg, "eager": eager, "sdpa-bias": sdpa}, flops=flops, x_label="tokens T")
