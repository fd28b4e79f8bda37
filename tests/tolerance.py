"""The tolerance rule of DESIGN.md §4.6, used by every op test:

    max|ours - ref64| <= 2 * max|torch_lowp - ref64| + atol * max(1, max|ref64|)

`ref64` is the op computed in float64; `torch_lowp` is plain PyTorch in the test's dtype (the error any
implementation in that precision makes). atol is small and per dtype, never widened per test; it scales
with the reference's magnitude above 1, since a value of 100 cannot be resolved below its ulp.
"""
import math

import torch

from fastnlg.ops.attention import visible_mask

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def measure(ours, lowp, ref64, dtype) -> tuple[float, float, float]:
    """(max|ours - ref64|, the rule's bound, max|lowp - ref64|); the error is inf where ours is not finite.
    Computed on ours' device (the GPU smoke run compares large tensors there)."""
    if ref64.numel() == 0:
        return 0.0, ATOL[dtype], 0.0
    ref64 = ref64.detach().double().to(ours.device)
    ours64 = ours.detach().double()
    lowp_err = (lowp.detach().double().to(ours.device) - ref64).abs().max().item()
    finite = bool(torch.isfinite(ours64).all())
    err = (ours64 - ref64).abs().max().item() if finite else float("inf")
    bound = 2 * lowp_err + ATOL[dtype] * max(1.0, ref64.abs().max().item())
    return err, bound, lowp_err


def assert_by_rule(name: str, ours, lowp, ref64, dtype=None):
    if ours is None and ref64 is None:
        return
    assert ours is not None and ref64 is not None, f"{name}: one side is None"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    err, bound, lowp_err = measure(ours, lowp, ref64, dtype or ours.dtype)
    assert err != float("inf"), f"{name}: non-finite values"
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch low-precision error {lowp_err:.3e})"


def grads_of(fn, inputs, dy):
    """Output and gradients of fn(*inputs) w.r.t. the inputs that require grad (None for the others)."""
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dy, allow_unused=True)
    it = iter(grads)
    return out, [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def leaf(t: torch.Tensor, dtype=None, requires_grad=True):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(requires_grad)


def assert_training_step_by_rule(build, step, patch):
    """A model under bf16 autocast, patched, against the same unpatched and the fp64 model (DESIGN's rule over a
    whole training step): its loss, and its whole gradient, within twice the unpatched model's error plus a
    small atol. build() -> a fresh model; step(model, autocast) -> (output with .loss, {name: gradient})."""
    o64, g64 = step(build().double(), False)
    op, gp = step(build(), True)
    ours = build()
    patch(ours)
    oo, go = step(ours, True)
    l64, lp, lo = o64.loss.item(), op.loss.item(), oo.loss.item()
    assert abs(lo - l64) <= 2 * abs(lp - l64) + 2e-3, (lo, lp, l64)
    assert go.keys() == gp.keys() == g64.keys()
    names = sorted(g64)
    ref, mine, plain = (torch.cat([g[n].double().flatten() for n in names]) for g in (g64, go, gp))
    assert (mine - ref).norm() <= 2 * (plain - ref).norm() + 2e-3 * ref.norm(), "gradient"


def eager_attention_lowp(q, k, v, causal=True, softmax_scale=None, window=None, softcap=None, key_padding_mask=None,
                cu_seqlens=None, **_):
    """Eager attention as Transformers runs it in q's dtype (scores and PV in that dtype, softmax in fp32):
    the error any implementation in that precision makes (the 'torch low precision' of the rule)."""
    rep = q.shape[1] // k.shape[1]
    scale = softmax_scale or 1 / math.sqrt(q.shape[-1])
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    ok = visible_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device,
                      key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    p = torch.softmax(s.float().masked_fill(~ok, -float("inf")), -1).nan_to_num(0.0).to(q.dtype)
    return p @ v.repeat_interleave(rep, 1)
