"""The smoke run's correctness steps (scripts/gpu_check.py SMOKE): every Triton kernel forward and backward
against its fp64 spec by the tolerance rule (tests/tolerance.py), a patched small Llama against the unpatched
one, and the CUDA extension's kernels. One row per (case, dtype): ok or FAIL with the worst error over the
outputs and gradients as a share of the rule's bound (`worst` <= 1 passes), or error with its message.

Cases run dtype by dtype (bf16, then fp16, then fp32; fp16 and fp32 on CPU, where the interpreter does not
round bf16 like a GPU), attention first: when the step's cap cuts the run, what is cut is the least telling.
Kernel tuning is off (FASTNLG_AUTOTUNE=0, the first candidate): the timings step tunes, and checks the tuned
config's output before it times it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

os.environ.setdefault("FASTNLG_AUTOTUNE", "0")


@dataclass
class Case:
    name: str
    make: Callable  # (tiny: bool) -> dict of fp32 CPU tensors and options
    ours: Callable  # (**inputs) -> tensor or tuple
    spec: Callable  # (**inputs) -> the same, in plain torch (the op's <op>_reference)
    grads: tuple = ()  # the inputs whose gradients are compared
    dtypes: tuple = ("bf16", "fp16", "fp32")
    keep: tuple = ()  # inputs passed as they are (integer tensors, masks, NF4 weights built per dtype)
    extra: dict = field(default_factory=dict)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _randn(*shape, scale=1.0):
    return torch.randn(*shape) * scale


def _rope_tables(B, T, D):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos()[None].expand(B, T, D).contiguous(), emb.sin()[None].expand(B, T, D).contiguous()


def _attn_shape(tiny):
    return (1, 4, 2, 48, 32) if tiny else (2, 16, 4, 1024, 128)  # B, Hq, Hkv, T, D


def _attn_inputs(tiny, T=None, S=None):
    B, Hq, Hkv, T0, D = _attn_shape(tiny)
    T, S = T or T0, S or T or T0
    return {"q": _randn(B, Hq, T, D), "k": _randn(B, Hkv, S, D), "v": _randn(B, Hkv, S, D)}


def _windowed(tiny, fractions):
    x = _attn_inputs(tiny)
    T = x["q"].shape[2]
    x["window"] = tuple(T // f if f else 0 for f in fractions)
    return x


def _padding(tiny):
    x = _attn_inputs(tiny)
    B, S = x["k"].shape[0], x["k"].shape[2]
    lengths = torch.tensor([S, S * 5 // 8] if B > 1 else [S * 5 // 8])
    x["key_padding_mask"] = torch.arange(S)[None] < lengths[:, None]
    return x


def _varlen(tiny):
    _, Hq, Hkv, T, D = _attn_shape(tiny)
    cuts = [0, T // 5, T // 2 + 3, T]
    return {"q": _randn(1, Hq, T, D), "k": _randn(1, Hkv, T, D), "v": _randn(1, Hkv, T, D),
            "cu_seqlens": torch.tensor(cuts, dtype=torch.int32), "max_seqlen": max(b - a for a, b in zip(cuts, cuts[1:]))}


def _decode(tiny):
    x = _attn_inputs(tiny, T=1, S=64 if tiny else 4096)
    return x


def _labels(N, V, ignored=0.25):
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < ignored] = -100
    return y


def _nf4_weight(W, dtype):
    from fastnlg.quant import quantize_nf4

    return quantize_nf4(W.to(dtype))


def cases() -> list:
    """The correctness cases, most telling first."""
    import importlib

    from fastnlg import ops

    # the op modules (fastnlg.ops re-exports functions of the same names)
    A, AL, CE, G, GL, LN, LL, RN, RP = (importlib.import_module(f"fastnlg.ops.{m}") for m in (
        "attention", "add_layer_norm", "cross_entropy", "gelu", "glu", "layer_norm", "lora_linear", "rms_norm", "rope"))

    att = ("q", "k", "v")

    def attn(**opts):
        return (lambda **x: ops.flash_attention(**x, **opts)), (lambda **x: A.attention_reference(**x, **opts))

    def flce_spec(hidden, weight, labels):
        return CE.cross_entropy_reference(torch.nn.functional.linear(hidden, weight), labels)

    out = []
    for name, opts, make in (
        ("attention causal GQA", dict(causal=True), _attn_inputs),
        ("attention causal window (T/8, 0) GQA", dict(causal=True), lambda tiny: _windowed(tiny, (8, 0))),
        ("attention bidirectional window (T/16, T/16)", dict(causal=False), lambda tiny: _windowed(tiny, (16, 16))),
        ("attention softcap 30", dict(causal=True, softcap=30.0), _attn_inputs),
        ("attention key padding, bidirectional", dict(causal=False), _padding),
        ("attention varlen (cu_seqlens)", dict(causal=True), _varlen),
    ):
        ours, spec = attn(**opts)
        out.append(Case(name, make, ours, spec, grads=att, keep=("key_padding_mask", "cu_seqlens", "max_seqlen")))
    out.append(Case("attention decode (flash-decoding, KV cache)", _decode,
                    lambda **x: ops.flash_attention(**x, causal=True, decode=True),
                    lambda **x: A.attention_reference(**x, causal=True)))
    out.append(Case("attention dropout 0.1 (statistics)", None, None, None, extra={"kind": "dropout"}))
    V_big = 128256
    out.append(Case("fused_linear_cross_entropy V=128256",
                    lambda tiny: {"hidden": _randn(16 if tiny else 1024, 32 if tiny else 1024),
                                  "weight": _randn(300 if tiny else V_big, 32 if tiny else 1024, scale=0.02),
                                  "labels": _labels(16 if tiny else 1024, 300 if tiny else V_big)},
                    lambda **x: ops.fused_linear_cross_entropy(**x), flce_spec, grads=("hidden", "weight"),
                    keep=("labels",)))
    LPm = importlib.import_module("fastnlg.ops.fused_linear_logprobs")
    DLm = importlib.import_module("fastnlg.ops.fused_linear_distillation_loss")
    n_lp = (lambda tiny: 16 if tiny else 2 * 4096)  # issue 28's GPU size: 2 x 4096 tokens, Llama 3's vocabulary
    out.append(Case("fused_linear_logprobs V=128256 (2 x 4096 tokens)",
                    lambda tiny: {"hidden": _randn(n_lp(tiny), 32 if tiny else 1024),
                                  "weight": _randn(300 if tiny else V_big, 32 if tiny else 1024, scale=0.02),
                                  "labels": _labels(n_lp(tiny), 300 if tiny else V_big)},
                    lambda **x: ops.fused_linear_logprobs(**x), lambda **x: LPm.fused_linear_logprobs_reference(**x),
                    grads=("hidden", "weight"), keep=("labels",)))
    out.append(Case("fused_linear_distillation_loss forward_kl V=128256 (2 x 4096 tokens)",
                    lambda tiny: {"student_hidden": _randn(n_lp(tiny), 32 if tiny else 1024),
                                  "student_weight": _randn(300 if tiny else V_big, 32 if tiny else 1024, scale=0.02),
                                  "teacher_hidden": _randn(n_lp(tiny), 32 if tiny else 1024),
                                  "teacher_weight": _randn(300 if tiny else V_big, 32 if tiny else 1024, scale=0.02),
                                  "labels": _labels(n_lp(tiny), 300 if tiny else V_big)},
                    lambda **x: ops.fused_linear_distillation_loss(**x),
                    lambda **x: DLm.fused_linear_distillation_loss_reference(**x),
                    grads=("student_hidden", "student_weight"), keep=("labels",)))
    out.append(Case("cross_entropy V=128256",
                    lambda tiny: {"logits": _randn(16 if tiny else 512, 300 if tiny else V_big, scale=2.0),
                                  "labels": _labels(16 if tiny else 512, 300 if tiny else V_big)},
                    lambda **x: ops.cross_entropy(**x), lambda **x: CE.cross_entropy_reference(**x),
                    grads=("logits",), keep=("labels",)))
    ce_opts = dict(softcap=30.0, z_loss=1e-4, label_smoothing=0.1)
    out.append(Case("cross_entropy softcap, z-loss, label smoothing",
                    lambda tiny: {"logits": _randn(16 if tiny else 512, 300 if tiny else 32000, scale=4.0),
                                  "labels": _labels(16 if tiny else 512, 300 if tiny else 32000)},
                    lambda **x: ops.cross_entropy(**x, **ce_opts), lambda **x: CE.cross_entropy_reference(**x, **ce_opts),
                    grads=("logits",), keep=("labels",)))
    rows, C = (lambda tiny: 16 if tiny else 2048), (lambda tiny: 64 if tiny else 4096)
    out.append(Case("rms_norm", lambda tiny: {"x": _randn(rows(tiny), C(tiny)), "weight": 1 + _randn(C(tiny), scale=0.1)},
                    lambda **x: ops.rms_norm(**x), lambda **x: RN.rms_norm_reference(**x), grads=("x", "weight")))
    out.append(Case("layer_norm", lambda tiny: {"x": _randn(rows(tiny), C(tiny)), "weight": 1 + _randn(C(tiny), scale=0.1),
                                                "bias": _randn(C(tiny), scale=0.1)},
                    lambda **x: ops.layer_norm(**x), lambda **x: LN.layer_norm_reference(**x),
                    grads=("x", "weight", "bias")))
    out.append(Case("add_layer_norm (BERT sublayer output)",
                    lambda tiny: {"x": _randn(rows(tiny), C(tiny)), "residual": _randn(rows(tiny), C(tiny)),
                                  "weight": 1 + _randn(C(tiny), scale=0.1), "bias": _randn(C(tiny), scale=0.1)},
                    lambda **x: ops.add_layer_norm(**x), lambda **x: AL.add_layer_norm_reference(**x),
                    grads=("x", "residual", "weight", "bias")))

    def rope_inputs(tiny):
        B, Hq, Hkv, T, D = _attn_shape(tiny)
        cos, sin = _rope_tables(B, T, D)
        return {"q": _randn(B, Hq, T, D), "k": _randn(B, Hkv, T, D), "cos": cos, "sin": sin}
    out.append(Case("apply_rope GQA", rope_inputs, lambda **x: ops.apply_rope(**x),
                    lambda **x: RP.apply_rope_reference(**x), grads=("q", "k")))
    inter = (lambda tiny: 96 if tiny else 11008)
    glu_in = (lambda tiny: {"gate": _randn(rows(tiny), inter(tiny)), "up": _randn(rows(tiny), inter(tiny))})
    out.append(Case("swiglu", glu_in, lambda **x: ops.swiglu(**x), lambda **x: GL.swiglu_reference(**x),
                    grads=("gate", "up")))
    out.append(Case("geglu tanh", glu_in, lambda **x: ops.geglu(**x), lambda **x: GL.geglu_reference(**x),
                    grads=("gate", "up")))
    out.append(Case("gelu tanh with bias (GPT-2 MLP)",
                    lambda tiny: {"x": _randn(rows(tiny), inter(tiny)), "bias": _randn(inter(tiny), scale=0.1)},
                    lambda **x: ops.gelu(**x), lambda **x: G.gelu_reference(**x), grads=("x", "bias")))
    out.append(Case("nf4 quantise/dequantise bytes", None, None, None, extra={"kind": "nf4"}))

    def lora_inputs(tiny, nf4):
        n_in, n_out, r = (64, 96, 8) if tiny else (4096, 4096, 16)
        W = _randn(n_out, n_in, scale=n_in ** -0.5)
        return {"x": _randn(32 if tiny else 2048, n_in), "weight": W, "lora_A": _randn(r, n_in, scale=0.05),
                "lora_B": _randn(n_out, r, scale=0.05), "nf4": nf4}
    lora = dict(scaling=2.0)
    out.append(Case("lora_linear over NF4", lambda tiny: lora_inputs(tiny, True),
                    lambda **x: ops.lora_linear(**x, **lora), lambda **x: LL.lora_linear_reference(**x, **lora),
                    grads=("x", "lora_A", "lora_B"), keep=("weight",)))
    out.append(Case("lora_linear dense", lambda tiny: lora_inputs(tiny, False),
                    lambda **x: ops.lora_linear(**x, **lora), lambda **x: LL.lora_linear_reference(**x, **lora),
                    grads=("x", "lora_A", "lora_B"), keep=("weight",)))
    return out


def _place(base: dict, case: Case, dtype, device) -> dict:
    """The case's inputs on `device` in `dtype` (floating tensors; leaves that require grad where compared)."""
    out = {}
    for k, v in base.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in case.keep:
            out[k] = v.to(device=device, dtype=dtype).requires_grad_(k in case.grads)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


def _frozen_weights(base: dict, dtype, device):
    """lora_linear's frozen base for (ours, the fp64 spec, the spec in dtype): dense in each dtype, or one NF4
    weight quantised from dtype, which the fp64 spec sees dequantised (exact in fp32, then fp64)."""
    W = base["weight"].to(device)
    if not base.get("nf4"):
        return W.to(dtype), W.double(), W.to(dtype)
    w = _nf4_weight(W, dtype)
    return w, w.dequantize(torch.float32).double(), w


def _outputs(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _forward_backward(fn, inputs, case: Case, dys):
    outs = _outputs(fn(**inputs))
    leaves = [inputs[k] for k in case.grads]
    if not leaves:
        return outs, ()
    grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(dys, outs)])
    return outs, grads


def check_case(case: Case, dt: str, device: str, tiny: bool) -> dict:
    """Outputs and gradients of ours, the spec in fp64 and the spec in `dt`, compared by the rule."""
    from tests.tolerance import measure

    torch.manual_seed(0)
    dtype = DTYPES[dt]
    base = case.make(tiny)
    frozen = _frozen_weights(base, dtype, device) if "nf4" in base else None
    base.pop("nf4", None)
    ours_in, ref_in, low_in = (_place(base, case, t, device) for t in (dtype, torch.float64, dtype))
    if frozen is not None:  # our NF4 quantisation itself is checked by the nf4 case
        ours_in["weight"], ref_in["weight"], low_in["weight"] = frozen
    with torch.no_grad():
        probe = _outputs(case.spec(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in low_in.items()}))
    dys = [torch.randn(p.shape, device=device) for p in probe]
    ours, g_ours = _forward_backward(case.ours, ours_in, case, dys)
    ref, g_ref = _forward_backward(case.spec, ref_in, case, [d.double() for d in dys])
    low, g_low = _forward_backward(case.spec, low_in, case, dys)
    errors, worst = {}, 0.0
    named = [(f"out{i}", o, lo, r) for i, (o, lo, r) in enumerate(zip(ours, low, ref))]
    named += [(f"d{k}", o, lo, r) for k, o, lo, r in zip(case.grads, g_ours, g_low, g_ref)]
    for name, o, lo, r in named:
        if o.shape != r.shape:
            return {"status": "FAIL", "error": f"{name}: shape {tuple(o.shape)}, the spec's {tuple(r.shape)}"}
        err, bound, low_err = measure(o, lo, r, dtype)
        errors[name] = [float(f"{err:.3g}"), float(f"{bound:.3g}")]
        worst = max(worst, err / bound if bound > 0 else math.inf)
    return {"status": "ok" if worst <= 1.0 else "FAIL", "worst": round(worst, 3), "errors": errors}


def check_dropout(dt: str, device: str, tiny: bool) -> dict:
    """q = 0 makes every visible key equally likely, and v = 1 makes row i's output the kept share of its
    keys over (1 - p): mean 1 and variance p / ((1 - p) S) per row, for bidirectional attention over S keys.
    Checks the mean within 6 standard errors, the variance within 25%, and a finite backward."""
    from fastnlg import ops

    p = 0.1
    B, H, T, D = (1, 2, 64, 32) if tiny else (4, 16, 1024, 64)
    dtype = DTYPES[dt]
    q = torch.zeros(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.ones(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
    o = ops.flash_attention(q, k, v, causal=False, dropout_p=p)
    rows = o[..., 0].float()
    mean, var = rows.mean().item(), rows.var().item()
    expect_var = p / ((1 - p) * T)
    stderr = math.sqrt(expect_var / rows.numel())
    o.sum().backward()
    finite = all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    ok = abs(mean - 1) <= 6 * stderr + 2e-3 and abs(var / expect_var - 1) <= 0.25 and finite
    return {"status": "ok" if ok else "FAIL", "mean": round(mean, 5), "expected_mean": 1.0,
            "variance_ratio": round(var / expect_var, 3), "finite_grads": finite}


def check_nf4(dt: str, device: str, tiny: bool) -> dict:
    """Quantised bytes and absmax equal the spec's exactly (and bitsandbytes' where it is installed);
    dequantised values equal the spec's exactly."""
    from fastnlg.quant import nf4 as N
    from fastnlg.quant import quantize_nf4

    dtype = DTYPES[dt]
    W = torch.randn(128 if tiny else 4096, 64 if tiny else 4096, device=device).to(dtype)
    w = quantize_nf4(W, double_quant=False)
    packed, absmax = N.quantize_nf4_reference(W)
    out = {"packed_equal": bool(torch.equal(w.packed.reshape(-1), packed.reshape(-1))),
           "absmax_equal": bool(torch.equal(w.absmax.float().reshape(-1), absmax.reshape(-1)))}
    deq = w.dequantize(dtype)
    out["dequantize_equal"] = bool(torch.equal(deq, N.dequantize_nf4_reference(packed, absmax, W.shape, dtype)))
    try:
        import bitsandbytes.functional as F
    except ImportError:
        out["bitsandbytes"] = "not installed"
    else:
        if device == "cuda":
            q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
            out["bitsandbytes_packed_equal"] = bool(torch.equal(q.reshape(-1), w.packed.reshape(-1)))
            out["bitsandbytes_absmax_equal"] = bool(torch.equal(state.absmax.float().reshape(-1), w.absmax.float().reshape(-1)))
        else:
            out["bitsandbytes"] = "CPU path not used as a reference (it differs on AVX-512 machines)"
    out["status"] = "ok" if all(v for k, v in out.items() if k.endswith("_equal")) else "FAIL"
    return out


def _dtypes(ctx) -> list:
    if ctx.device != "cuda":  # the CPU rehearsal (kernels under the interpreter): the low-precision path once
        return ["fp16"]
    has_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    return ["bf16", "fp16", "fp32"] if has_bf16 else ["fp16", "fp32"]


def correctness(ctx) -> None:
    for dt in _dtypes(ctx):
        for case in cases():
            if dt not in case.dtypes:
                continue
            kind = case.extra.get("kind")
            if kind == "dropout":
                fn = lambda: check_dropout(dt, ctx.device, ctx.tiny)  # noqa: E731
            elif kind == "nf4":
                fn = lambda: check_nf4(dt, ctx.device, ctx.tiny)  # noqa: E731
            else:
                fn = lambda c=case: check_case(c, dt, ctx.device, ctx.tiny)  # noqa: E731
            ctx.run(case.name, fn, dtype=dt)
            if ctx.device == "cuda":
                torch.cuda.empty_cache()


def _llama(tiny: bool):
    import transformers

    size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=300) if tiny else
            dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1408, vocab_size=32000))
    cfg = transformers.LlamaConfig(**size, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _batch(model, tiny: bool, device):
    B, T = (2, 24) if tiny else (4, 256)
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, : T // 4] = 0  # left padding in one row: the key padding path
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _loss_and_grads(model, batch, autocast: bool, device):
    model.zero_grad(set_to_none=True)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)
    with amp:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def llama(ctx) -> None:
    """A small Llama on the device, fp32 weights under bf16 autocast: the patched model's loss and every
    gradient against the unpatched model's by the rule (the unpatched model in fp64 the reference, under
    autocast the low-precision side); greedy generation patched and unpatched; the host reads a patched
    training step makes (tests/host_syncs.py)."""
    import copy

    import fastnlg
    from tests.tolerance import measure

    dev = ctx.device
    base = _llama(ctx.tiny).to(dev)
    batch = _batch(base, ctx.tiny, dev)
    prompt = batch["input_ids"][:1, :8]
    state = {}

    def unpatched():  # before any patch: fastnlg's rope swap is module-wide
        ref = copy.deepcopy(base).double()
        state["ref"] = _loss_and_grads(ref, batch, False, dev)
        del ref
        state["low"] = _loss_and_grads(base, batch, True, dev)
        with torch.no_grad():
            state["tokens"] = base.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        return {}
    if ctx.run("unpatched reference and low-precision runs", unpatched)["status"] != "ok":
        return

    def patched():
        model = copy.deepcopy(base)
        report = fastnlg.patch(model)
        state["model"] = model
        loss, grads = _loss_and_grads(model, batch, True, dev)
        (ref_loss, ref_grads), (low_loss, low_grads) = state["ref"], state["low"]
        err, bound, _ = measure(loss.reshape(1), low_loss.reshape(1), ref_loss.reshape(1), torch.bfloat16)
        worst, worst_name, errors = err / bound, "loss", {"loss": [err, bound]}
        for name, g in grads.items():
            e, b, _ = measure(g, low_grads[name], ref_grads[name], torch.bfloat16)
            errors[name] = [float(f"{e:.3g}"), float(f"{b:.3g}")]
            if e / b > worst:
                worst, worst_name = e / b, name
        missing = sorted(set(ref_grads) - set(grads))
        return {"status": "ok" if worst <= 1 and not missing else "FAIL", "worst": round(worst, 3),
                "worst_tensor": worst_name, "loss": float(loss), "unpatched_loss": float(low_loss),
                "fp64_loss": float(ref_loss), "missing_grads": missing, "patched": len(report.patched),
                "errors": errors}
    if ctx.run("patched vs unpatched: loss and every gradient, bf16 autocast", patched)["status"] == "error":
        return

    def generate():
        with torch.no_grad():
            ours = state["model"].generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        same = int((ours == state["tokens"]).all(-1).sum())
        agree = float((ours == state["tokens"]).float().mean())
        return {"status": "ok" if same == ours.shape[0] else "FAIL", "tokens_agree": round(agree, 3),
                "patched_tokens": ours[0, -16:].tolist(), "unpatched_tokens": state["tokens"][0, -16:].tolist()}
    ctx.run("greedy generate, fp32: patched tokens equal unpatched", generate)

    def syncs():
        if dev != "cuda":
            return {"status": "skipped", "reason": "host syncs are recorded on CUDA only"}
        from tests import host_syncs

        model = state["model"]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up: kernel tuning reads the clock
        torch.cuda.synchronize()
        with host_syncs.record() as seen:
            for _ in range(3):
                step()
        bad = host_syncs.unexpected(seen)
        return {"status": "ok" if not bad else "FAIL", "syncs_per_3_steps": dict(seen), "unexpected": bad}
    ctx.run("host reads in 3 patched training steps", syncs)


def cuda_ext(ctx) -> None:
    """Builds fastnlg._C_cuda for this GPU's architecture, then its NF4 dequantise and batch-1 GEMV against
    the spec (exact) and the dequantise-then-matmul path (the rule)."""
    import subprocess
    import sys

    if ctx.device != "cuda":
        ctx.row("build", "skipped", reason="the CUDA extension needs a GPU")
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    major, minor = torch.cuda.get_device_capability()

    def build():  # in place: fastnlg/_C_cuda*.so beside the package the editable install points at
        env = dict(os.environ, FASTNLG_BUILD_CUDA="1", FASTNLG_CUDA_ARCHS=f"{major}{minor}")
        r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=max(5, ctx.left() - 5))
        if r.returncode:
            return {"status": "FAIL", "error": (r.stdout + r.stderr)[-1500:]}
        return {}
    if ctx.run("build for this GPU (FASTNLG_BUILD_CUDA=1)", build, min_left=15)["status"] != "ok":
        return

    def kernels():
        import importlib

        importlib.invalidate_caches()
        from fastnlg import backend
        from fastnlg.quant import _backends, quantize_nf4
        from fastnlg.quant import nf4 as N
        from tests.tolerance import measure

        backend.has_cuda_ext.cache_clear()
        if not backend.has_cuda_ext():
            return {"status": "FAIL", "error": "fastnlg._C_cuda does not import after the build"}
        out = {}
        for dt in _dtypes(ctx):
            dtype = DTYPES[dt]
            W = torch.randn(4096, 4096, device="cuda").to(dtype)
            w = quantize_nf4(W, double_quant=False)
            with backend.use("cuda", op="dequantize_nf4"):
                deq = _backends.dequantize(w, dtype)
            ref = N.dequantize_nf4_reference(w.packed, w.absmax_fp32().float(), W.shape, dtype)
            out[f"dequantize_{dt}_equal"] = bool(torch.equal(deq, ref))
            x = torch.randn(4096, device="cuda").to(dtype)
            y = _backends.gemv(x, w)
            err, bound, _ = measure(y, torch.nn.functional.linear(x, ref), torch.nn.functional.linear(
                x.double(), ref.double()), dtype)
            out[f"gemv_{dt}_within_rule"] = err <= bound
        out["status"] = "ok" if all(out.values()) else "FAIL"
        return out
    ctx.run("NF4 dequantise and batch-1 GEMV (CUDA kernels)", kernels)
