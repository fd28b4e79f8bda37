"""Attention forward and forward+backward: fastnlg.flash_attention vs eager attention (Transformers' eager
path: repeat K/V, scores, fp32 softmax), PyTorch SDPA forced to its flash and memory-efficient backends, and
the flash-attn package when installed. q (B, Hq, T, D), k/v (B, Hkv, T, D); Hq = 32 (16 for D = 128 at
16k tokens is not special-cased: B is chosen so that B * T = 16k tokens).

FLOPs (the convention of the FlashAttention papers): forward 4 B Hq T S D, halved when causal; backward
2.5x forward, so fwd+bwd = 3.5x forward.
"""
import contextlib

import torch
import torch.nn.functional as F

from fastnlg.ops import flash_attention

from .harness import Bench, Case
from .peers import available, missing


def eager(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1), -float("inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _sdpa(backend_name):
    def run(q, k, v, causal):
        ctx = contextlib.nullcontext()
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel(getattr(SDPBackend, backend_name))
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def fastnlg(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal)


def _peers():
    why = available("flash_attn")
    if why is not None:
        return {"flash-attn": missing(why)}
    from flash_attn import flash_attn_func

    def flash_attn(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    return {"flash-attn": flash_attn}


def cases(quick, device):
    if quick:
        return [Case("B=1,H=4/2,T=256,D=64,causal", {"B": 1, "Hq": 4, "Hkv": 2, "T": 256, "D": 64, "causal": True}, 256)]
    out = []
    for D in (64, 128):
        for causal in (False, True):
            for hkv in (32, 8):  # MHA and GQA 4:1
                for T in (512, 1024, 2048, 4096, 8192, 16384):
                    p = {"B": max(1, 16384 // T), "Hq": 32, "Hkv": hkv, "T": T, "D": D, "causal": causal}
                    out.append(Case(f"B={p['B']},H=32/{hkv},T={T},D={D}," + ("causal" if causal else "full"), p, T))
    return out


def make_inputs(p, device, dtype):
    B, T, D = p["B"], p["T"], p["D"]
    mk = lambda h: torch.randn(B, h, T, D, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return {"q": mk(p["Hq"]), "k": mk(p["Hkv"]), "v": mk(p["Hkv"]), "causal": p["causal"]}


def flops(p, mode):
    fwd = 4 * p["B"] * p["Hq"] * p["T"] * p["T"] * p["D"] / (2 if p["causal"] else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


BENCH = Bench("attention", cases, make_inputs,
              {"fastnlg": fastnlg, "eager": eager, "sdpa-flash": _sdpa("FLASH_ATTENTION"),
               "sdpa-mem-efficient": _sdpa("EFFICIENT_ATTENTION"), **_peers()},
              flops=flops, x_label="tokens T")
