"""The smoke run's headline timings (scripts/gpu_check.py SMOKE), most telling first, each measured side by
side (benchmarks/side_by_side.py: the implementations alternate on the same inputs in one process; the ratio
is the median of the per-round ratios with its p20-p80 spread) after its output is checked against the fp64
spec (on a slice where the full reference would not fit). Each row: per implementation its median time and
p20-p80, TFLOP/s or GB/s (the formula beside each case), peak memory (measured alone, after the timing), and
fastnlg's ratio against the baseline with its verdict. Peers that are not installed are named in the row.

The tuned tile configs are written to tuned_configs.json after every case (so a later run can skip tuning).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from .harness import peak_memory_mb
from .peers import NotInstalled
from .side_by_side import compare


def _write_tuned(ctx) -> None:
    from fastnlg.kernels import _autotune

    rows = [{"key": [str(k) for k in key], "config": list(cfg)} for key, cfg in _autotune.chosen().items()]
    with open(os.path.join(ctx.out_dir, "tuned_configs.json"), "w") as f:
        json.dump(rows, f, indent=1)


def _measure(ctx, fns: dict, baseline: str, *, flops=None, nbytes=None, rounds=10, calls=1) -> dict:
    """Times fns side by side, then each one's peak memory alone; -> the row's fields."""
    dev = ctx.device
    cmp = compare(fns, device=dev, baseline=baseline, rounds=3 if ctx.tiny else rounds, warmup=1 if ctx.tiny else 2,
                  calls=calls, deadline=ctx.deadline - 20)
    out = {"baseline": baseline, "impls": {}}
    for name, t in cmp.ms.items():
        row = {"median_ms": round(t.median, 4), "p20_ms": round(t.p20, 4), "p80_ms": round(t.p80, 4)}
        if flops:
            row["tflop_per_s"] = round(flops / (t.median * 1e-3) / 1e12, 2)
        if nbytes:
            row["gb_per_s"] = round(nbytes / (t.median * 1e-3) / 1e9, 1)
        out["impls"][name] = row
    for name, fn in fns.items():
        out["impls"][name]["peak_mb"] = round(peak_memory_mb(fn, dev) or float("nan"), 1)
    for name in fns:
        if name != baseline:
            r = cmp.ratio(name)
            out["impls"][name].update(ratio=round(r.median, 3), ratio_p20=round(r.p20, 3), ratio_p80=round(r.p80, 3),
                                      verdict=r.verdict())
    out["rounds"] = len(cmp.times[baseline])
    return out


def _fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out)) if out.dim() else out.backward()
    return run


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def attention(ctx, T: int) -> dict:
    """fastnlg's FlashAttention-2 kernels vs SDPA's flash backend, causal bf16, B=4 H=32 D=128 (fp16 on a GPU
    without bf16). FLOPs: 4 B H T^2 D / 2 forward (causal halves it), 2.5x that backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastnlg.ops import flash_attention
    from fastnlg.ops.attention import attention_reference
    from tests.tolerance import measure

    B, H, D = (1, 2, 32) if ctx.tiny else (4, 32, 128)
    T = 64 if ctx.tiny else T
    dtype = _half(ctx)
    q, k, v = (torch.randn(B, H, T, D, device=ctx.device, dtype=dtype, requires_grad=True) for _ in range(3))
    backend = SDPBackend.FLASH_ATTENTION if ctx.device == "cuda" else SDPBackend.MATH

    def ours():
        return flash_attention(q, k, v, causal=True)

    def sdpa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.no_grad():  # the check: one head of batch 0 in fp64 (the whole reference is B H T^2 doubles)
        sl = (slice(0, 1), slice(0, 1))
        ref = attention_reference(*(t[sl].double() for t in (q, k, v)), causal=True)
        err, bound, sdpa_err = measure(ours()[sl], sdpa()[sl], ref, dtype)
    fwd = 4 * B * H * T * T * D / 2
    out = {"check": "ok" if err <= bound else f"FAIL: max error {err:.3g} > bound {bound:.3g}", "shape": [B, H, T, D],
           "dtype": str(dtype).replace("torch.", "")}
    out["fwd"] = _measure(ctx, {"fastnlg": _no_grad(ours), "sdpa-flash": _no_grad(sdpa)}, "sdpa-flash", flops=fwd)
    out["fwd+bwd"] = _measure(ctx, {"fastnlg": _fwd_bwd(ours, (q, k, v)), "sdpa-flash": _fwd_bwd(sdpa, (q, k, v))},
                              "sdpa-flash", flops=3.5 * fwd, rounds=8)
    return out


def _half(ctx):
    if ctx.device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


def fused_loss(ctx) -> dict:
    """fused_linear_cross_entropy vs eager (F.linear + F.cross_entropy on fp32 logits) and the peers, N=16384
    V=128256 C=4096 bf16, forward + backward. FLOPs 6 N V C; peak memory is what matters most here."""
    from fastnlg.ops import fused_linear_cross_entropy

    from .peers import fused_linear_cross_entropy_peers

    N, V, C = (64, 500, 32) if ctx.tiny else (16384, 128256, 4096)
    dtype = _half(ctx)
    h = torch.randn(N, C, device=ctx.device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, C, device=ctx.device, dtype=dtype) / C ** 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device=ctx.device)
    impls = {"fastnlg": lambda: fused_linear_cross_entropy(h, w, y),
             "eager": lambda: F.cross_entropy(F.linear(h, w).float(), y)}
    impls.update({name: (lambda fn=fn: fn(hidden=h, weight=w, labels=y))
                  for name, fn in fused_linear_cross_entropy_peers().items()})
    losses, skipped = {}, {}
    with torch.no_grad():
        for name, fn in list(impls.items()):
            try:
                losses[name] = float(fn())
            except NotInstalled as exc:  # a peer that cannot run here: named in the row
                skipped[name] = str(exc)
                del impls[name]
    base = losses["eager"]
    bad = {n: v for n, v in losses.items() if not abs(v - base) <= 2e-3 * max(1.0, abs(base))}
    out = {"check": "ok" if not bad else f"FAIL: losses {bad} vs eager {base:.6f}", "losses": losses,
           "not_run": skipped, "shape": [N, V, C]}
    out.update(_measure(ctx, {n: _fwd_bwd(fn, (h, w)) for n, fn in impls.items()}, "eager",
                        flops=6 * N * V * C, rounds=6))
    return out


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def norms_glu(ctx, with_compile: bool) -> dict:
    """RMSNorm (8192 x 4096) and SwiGLU (8192 x 14336) forward + backward, GB/s, vs eager (and torch.compile).
    Bytes: RMSNorm reads x, w, dy and writes y, dx: 5 N C elements; SwiGLU reads gate, up, dy and writes y,
    dgate, dup: 6 N C elements."""
    from fastnlg.ops import rms_norm, swiglu
    from fastnlg.ops.glu import swiglu_reference
    from fastnlg.ops.rms_norm import rms_norm_reference

    dtype = _half(ctx)
    es = torch.finfo(dtype).bits // 8
    out = {}
    N, C, I = (64, 128, 256) if ctx.tiny else (8192, 4096, 14336)
    x = torch.randn(N, C, device=ctx.device, dtype=dtype, requires_grad=True)
    wt = torch.ones(C, device=ctx.device, dtype=dtype, requires_grad=True)

    def op(ours, spec, leaves, nbytes, calls):  # fastnlg, eager (the spec) and, when asked, torch.compile of it
        impls = {"fastnlg": lambda: ours(*leaves), "eager": lambda: spec(*leaves)}
        if with_compile:
            compiled = _compiled(spec)
            impls["torch.compile"] = lambda: compiled(*leaves)
        return _measure(ctx, {n: _fwd_bwd(f, leaves) for n, f in impls.items()}, "eager", nbytes=nbytes,
                        calls=calls)
    out["rms_norm"] = op(rms_norm, rms_norm_reference, (x, wt), 5 * N * C * es, 5)
    g, u = (torch.randn(N, I, device=ctx.device, dtype=dtype, requires_grad=True) for _ in range(2))
    out["swiglu"] = op(swiglu, swiglu_reference, (g, u), 6 * N * I * es, 3)
    return out


def train_step(ctx, method: str, size: str, batch: int, seq: int) -> dict:
    """One optimizer step as `fastnlg train` runs it (benchmarks/bench_train_step.py), fastnlg against
    Transformers + PEFT with SDPA: tokens/s and peak memory. The two models are alive together and their
    steps alternate; fastnlg.patch's RoPE swap is module-wide, so the unpatched model runs fastnlg's RoPE
    too (which can only flatter the baseline)."""
    from .bench_train_step import SIZES, Step

    if ctx.tiny:
        size, batch, seq = ("bert-tiny" if SIZES[size].get("arch") == "bert" else "small"), 2, 64
    p = {**SIZES[size], "method": method, "size": size, "batch": batch, "seq": seq}
    dtype = _half(ctx) if ctx.device == "cuda" else torch.float32
    steps = {name: Step(p, ctx.device, dtype) for name in ("fastnlg", "eager")}
    fns = {name: (lambda s=steps[name], n=name: s(n)) for name in steps}
    tokens = batch * seq
    out = _measure(ctx, fns, "eager", rounds=5)
    for row in out["impls"].values():
        row["tokens_per_s"] = round(tokens / (row["median_ms"] * 1e-3))
    for s in steps.values():
        s.free()
    out.update(shape=p, tokens=tokens)
    return out


def qlora_memory(ctx, seqs=(4096, 16384)) -> dict:
    """The peak memory of one QLoRA training step of an 8B-shaped Llama (Llama 3 8B: hidden 4096, 32 layers,
    V 128256) at each sequence length, fastnlg.patch'ed: what decides whether it fits a 24 GB GPU. The frozen
    base is bitsandbytes' NF4 where it is installed, else fastnlg's NF4Linear."""
    from .bench_train_step import SIZES, Step

    size, seqs = ("small", (32, 64)) if ctx.tiny else ("8B", seqs)
    p = {**SIZES[size], "method": "qlora", "size": size, "batch": 1, "seq": seqs[0]}
    step = Step(p, ctx.device, _half(ctx) if ctx.device == "cuda" else torch.float32)
    out = {"shape": p, "peak_mb": {}}
    try:
        for seq in seqs:
            if ctx.left() < 20:
                out["peak_mb"][seq] = "not run: step cap"
                continue
            step.set_shape(1, seq)
            step("fastnlg")  # built (and warmed up) on the first call
            out["peak_mb"][seq] = round(peak_memory_mb(lambda: step("fastnlg"), ctx.device) or float("nan"), 1)
    finally:
        step.free()
    return out


def timings(ctx) -> None:
    half = str(_half(ctx)).replace("torch.", "")
    cases = [
        ("attention causal T=4096 (B=4 H=32 D=128)", lambda: attention(ctx, 4096)),
        ("fused linear + loss N=16384 V=128256 C=4096", lambda: fused_loss(ctx)),
        ("training step 1.1B Llama LoRA 4 x 2048 tokens", lambda: train_step(ctx, "lora", "1.1B", 4, 2048)),
        ("training step BERT-base NER full 32 x 128 tokens", lambda: train_step(ctx, "full", "bert-base", 32, 128)),
        ("rms_norm and swiglu vs eager", lambda: norms_glu(ctx, False)),
        ("attention causal T=16384 (B=4 H=32 D=128)", lambda: attention(ctx, 16384)),
        ("peak memory of an 8B QLoRA step at 4k and 16k tokens", lambda: qlora_memory(ctx)),
        ("rms_norm and swiglu vs eager and torch.compile", lambda: norms_glu(ctx, ctx.device == "cuda")),
    ]
    for name, fn in cases:
        def run(fn=fn):
            out = fn()
            bad = [k for k, v in out.items() if k == "check" and str(v).startswith("FAIL")]
            return {**out, "status": "FAIL" if bad else "ok"}
        ctx.run(name, run, min_left=15, dtype=half)
        _write_tuned(ctx)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
