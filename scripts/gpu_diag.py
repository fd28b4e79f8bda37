"""A follow-up to the first smoke run (benchmarks/results/NVIDIA_H200-20261204/smoke): where the flash-attention
dK goes wrong on the GPU, whether the fp32 kernels now multiply in fp32, and how NF4's fp32 bytes differ from
bitsandbytes'. One device command:

    python3 scripts/gpu_diag.py --budget 240 --out "$OUT"      (--tiny on CPU under TRITON_INTERPRET=1)

Rows go to OUT/diag.jsonl as they finish; the last lines printed are a short table.
  attention/<case>/<dtype>/<config>: dq, dk, dv max |ours - fp64| beside the rule's bound, for every backward
      tile config of the table (tuning off, one config at a time), a second run's dK equal bit for bit or not,
      and where dK errs: the key positions with the largest error and the error by position within a 64-block.
  attention/<case>/<dtype>/emulated: dK from fp64 pieces with only dS rounded to the dtype (what any
      FlashAttention-2 that feeds dS to the matrix units in fp16 / bf16 must err by).
  nf4/fp32: how many packed bytes differ from bitsandbytes', and for the first ones the value, its block's
      absmax, the scaled value and its distance to the nearest NF4 midpoint in fp32 ulps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["FASTNLG_AUTOTUNE"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _emulated_dk(q, k, v, do, causal, window, kpm, dtype):
    """dK with only dS rounded to `dtype` (everything else fp64): the spec's masks (visible_mask), GQA summed."""
    from fastnlg.ops.attention import visible_mask

    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5
    ok = visible_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device, key_padding_mask=kpm)
    p = torch.softmax((q @ ke.transpose(-1, -2) * scale).masked_fill(~ok, float("-inf")), -1)
    o = p @ ve
    dp = do @ ve.transpose(-1, -2)
    delta = (do * o).sum(-1, keepdim=True)
    ds = (p * (dp - delta)).to(dtype).double()
    dk = scale * ds.transpose(-1, -2) @ q
    B, Hq, S, D = dk.shape
    return dk.view(B, Hq // group, group, S, D).sum(2)


def _case_inputs(name, tiny, device):
    B, Hq, Hkv, T, D = (1, 4, 2, 96, 32) if tiny else (2, 16, 4, 1024, 128)
    if name.endswith("@64"):  # BERT-base's head dim, no GQA
        name = name[:-3]
        B, Hq, Hkv, T, D = (1, 2, 2, 96, 32) if tiny else (4, 12, 12, 512, 64)
    torch.manual_seed(0)
    x = {"q": torch.randn(B, Hq, T, D), "k": torch.randn(B, Hkv, T, D), "v": torch.randn(B, Hkv, T, D)}
    opts = {"causal": True}
    if name == "window":
        x["window"] = (T // 8, 0)
    if name == "padding":
        opts = {"causal": False}
        x["key_padding_mask"] = torch.arange(T)[None] < torch.tensor(([T, T * 5 // 8] * B)[:B] if B > 1 else [T * 5 // 8])[:, None]
    x = {n: t.to(device) for n, t in x.items() if isinstance(t, torch.Tensor)} | (
        {"window": x["window"]} if "window" in x else {})
    return x, opts


def attention_rows(dtypes, cases, tiny, device, deadline, emit, probes=None):
    probes = probes or {}
    from fastnlg import ops
    from fastnlg.kernels import attention as kern
    from fastnlg.ops.attention import attention_reference
    from tests.tolerance import eager_attention_lowp, measure

    DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for case in cases:
        base, opts = _case_inputs(case, tiny, device)
        window = base.get("window")
        kpm = base.get("key_padding_mask")
        for dt in dtypes:
            dtype = DT[dt]
            D = base["q"].shape[-1]
            block_d = max(32, 1 << (D - 1).bit_length())
            table = kern._config_table(True, dtype)
            saved = list(table[block_d])
            gen = torch.Generator(device="cpu").manual_seed(1)
            do = torch.randn(base["q"].shape, generator=gen).to(device)
            ref_in = {n: base[n].double().requires_grad_() for n in ("q", "k", "v")}
            spec = dict(causal=opts["causal"], window=window, key_padding_mask=kpm)
            o64 = attention_reference(ref_in["q"], ref_in["k"], ref_in["v"], **spec)
            g64 = torch.autograd.grad(o64, [ref_in[n] for n in "qkv"], do.double())
            low_in = {n: base[n].to(dtype).requires_grad_() for n in "qkv"}
            olow = eager_attention_lowp(low_in["q"], low_in["k"], low_in["v"], **spec)
            glow = torch.autograd.grad(olow, [low_in[n] for n in "qkv"], do.to(dtype))
            emu = _emulated_dk(ref_in["q"].detach(), ref_in["k"].detach(), ref_in["v"].detach(), do.double(),
                               opts["causal"], window, kpm, dtype)
            e_err, e_bound, _ = measure(emu, glow[1], g64[1], dtype)
            emit({"row": f"attention/{case}/{dt}/emulated", "dk": [e_err, e_bound]})
            candidates = saved if device == "cuda" else saved[:1]
            candidates = candidates + [c for c in probes.get(block_d, []) if c not in candidates]
            for cfg in candidates:
                if time.time() > deadline:
                    emit({"row": f"attention/{case}/{dt}/{cfg}", "skipped": "budget"})
                    continue
                table[block_d] = [cfg]
                try:
                    t0 = time.time()
                    ins = {n: base[n].to(dtype).requires_grad_() for n in "qkv"}
                    extra = {n: base[n] for n in ("window", "key_padding_mask") if n in base}
                    out = ops.flash_attention(ins["q"], ins["k"], ins["v"], **opts, **extra)
                    g = torch.autograd.grad(out, [ins[n] for n in "qkv"], do.to(dtype))
                    g2 = torch.autograd.grad(ops.flash_attention(ins["q"], ins["k"], ins["v"], **opts, **extra),
                                             [ins["q"], ins["k"]], do.to(dtype))
                    row = {"row": f"attention/{case}/{dt}/{tuple(cfg)}", "seconds": round(time.time() - t0, 2),
                           "dk_repeatable": bool(torch.equal(g[1], g2[1])), "dq_repeatable": bool(torch.equal(g[0], g2[0])),
                           "excluded_here": device == "cuda" and not kern.has_candidate(
                               kern._group(kern.attn_bwd_dkdv_kernel, dtype, block_d, False), [cfg], ins["q"].device)}
                    for name, a, lo, r in zip(("dq", "dk", "dv"), g, glow, g64):
                        err, bound, _ = measure(a, lo, r, dtype)
                        row[name] = [float(f"{err:.3g}"), float(f"{bound:.3g}")]
                    dk_err = (g[1].double() - g64[1]).abs()
                    per_key = dk_err.amax(dim=(0, 1, 3))
                    top = torch.topk(per_key, min(8, per_key.numel()))
                    row["dk_worst_keys"] = [[int(i), float(f"{e:.3g}")] for e, i in zip(top.values, top.indices)]
                    by_mod = per_key.view(-1, 64).amax(0) if per_key.numel() % 64 == 0 else per_key[:64]
                    row["dk_err_by_key_mod_64"] = [float(f"{e:.2g}") for e in by_mod.tolist()]
                    row["dk_err_by_kv_head"] = [float(f"{e:.3g}") for e in dk_err.amax(dim=(0, 2, 3)).tolist()]
                    row["dk_err_by_batch"] = [float(f"{e:.3g}") for e in dk_err.amax(dim=(1, 2, 3)).tolist()]
                    emit(row)
                except Exception as e:  # noqa: BLE001 - a config that does not launch is a finding
                    emit({"row": f"attention/{case}/{dt}/{tuple(cfg)}", "error": f"{type(e).__name__}: {e}"[:400]})
                finally:
                    table[block_d] = saved


def nf4_rows(device, emit):
    from fastnlg.quant import quantize_nf4
    from fastnlg.quant.nf4_reference import NF4_MIDPOINTS

    torch.manual_seed(0)
    W = torch.randn(4096, 4096, device=device)
    w = quantize_nf4(W, double_quant=False)
    try:
        import bitsandbytes.functional as F
    except ImportError:
        emit({"row": "nf4/fp32", "bitsandbytes": "not installed"})
        return
    qb, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    a, b = w.packed.reshape(-1), qb.reshape(-1)
    diff = (a != b).nonzero().flatten()
    row = {"row": "nf4/fp32", "bytes": a.numel(), "bytes_differ": int(diff.numel()),
           "absmax_equal": bool(torch.equal(state.absmax.float().reshape(-1), w.absmax.float().reshape(-1)))}
    flat = W.reshape(-1)
    mids = NF4_MIDPOINTS.to(device)
    examples = []
    for byte in diff[:12].tolist():
        for half, shift in ((0, 4), (1, 0)):
            i = 2 * byte + half
            ours, theirs = (int(a[byte]) >> shift) & 15, (int(b[byte]) >> shift) & 15
            if ours == theirs:
                continue
            am = w.absmax.float().reshape(-1)[i // 64]
            x = flat[i]
            scaled = x * (1.0 / am)
            m = mids[(mids - scaled).abs().argmin()]
            ulp = float(torch.nextafter(m, m + 1) - m)
            examples.append({"index": i, "x": float(x), "absmax": float(am), "scaled": float(scaled),
                             "x_div_absmax": float(x / am), "nearest_midpoint": float(m),
                             "ulps_from_midpoint": float((scaled - m) / ulp), "ours": ours, "bitsandbytes": theirs})
    row["examples"] = examples
    emit(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240)
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--probe", action="store_true", help="the tile race probe (see main)")
    args = ap.parse_args(argv)
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    rows = []

    def emit(row):
        rows.append(row)
        with open(os.path.join(args.out, "diag.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print("diag:", json.dumps(row)[:300], flush=True)

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    emit({"row": "env", **env})
    deadline = start + args.budget * 0.75
    lowp = ["fp16", "bf16"] if device == "cuda" else ["fp16"]
    if args.probe:  # the second run: which backward tiles race, at D 128 and 64 (stages 1 / 2, 4 / 8 warps)
        probes = {128: [(32, 64, 8, 1), (32, 64, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
                  64: [(32, 64, 8, 1), (32, 32, 4, 1), (64, 64, 4, 1), (16, 32, 4, 2), (32, 32, 8, 2)],
                  32: [(32, 32, 4, 2)]}
        attention_rows(["fp16"], ["causal", "padding@64"], args.tiny, device, start + args.budget, emit, probes)
    else:
        attention_rows(["fp32"], ["causal"], args.tiny, device, deadline, emit)
        attention_rows(lowp, ["causal", "window"], args.tiny, device, deadline, emit)
        if device == "cuda":
            nf4_rows(device, emit)
        attention_rows(lowp, ["padding"], args.tiny, device, start + args.budget, emit)
    print("\n== summary ==")
    for r in rows:
        if r["row"].startswith("attention"):
            print(f"{r['row']:<52} " + " ".join(f"{n}={r[n][0]:.3g}/{r[n][1]:.3g}" for n in ("dq", "dk", "dv") if n in r)
                  + (f" rep dk={r['dk_repeatable']} dq={r['dq_repeatable']} excl={r['excluded_here']}"
                     if "dk_repeatable" in r else "") + (f" {r.get('error', '')[:80]}"))
        elif r["row"].startswith("nf4"):
            print("nf4/fp32", {k: v for k, v in r.items() if k != "examples"})
            for e in r.get("examples", [])[:4]:
                print("   ", e)
    print(f"diag: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
