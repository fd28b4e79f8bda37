"""Every public op runs under torch.autocast with fp32 inputs, forward and backward, as the torch op it
replaces does: the matmul ops (lora_linear, fused_linear_cross_entropy, flash_attention) compute in the
autocast dtype (exactly the op on inputs cast to it, gradients back in fp32 for fp32 leaves); the
element-wise and reduction ops are untouched by autocast (exactly the op without it)."""
import pytest
import torch

from fastnlg.ops import (
    apply_rope,
    cross_entropy,
    flash_attention,
    fused_linear_cross_entropy,
    geglu,
    layer_norm,
    lora_linear,
    rms_norm,
    swiglu,
)

AMP = [torch.bfloat16, torch.float16]


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).mul_(0.5).requires_grad_() for s in shapes]


def _run(fn, leaves, amp):
    for t in leaves:
        t.grad = None
    with torch.autocast("cpu", amp, enabled=amp is not None):
        out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs], [None if t.grad is None else t.grad.clone() for t in leaves]


def _cast_leaves(leaves, dtype):
    """The same values cast differentiably (what autocast does), gradients flowing to the fp32 leaves."""
    return lambda fn: (lambda *ts: fn(*[t.to(dtype) for t in ts]))


MATMUL_OPS = {
    "lora_linear": (lambda x, W, A, B: lora_linear(x, W.detach(), A, B, scaling=2.0), [(6, 16), (8, 16), (4, 16), (8, 4)]),
    "fused_linear_cross_entropy": (  # the loss is fp32 under autocast (as F.cross_entropy's): ask for it outside
        lambda h, W: fused_linear_cross_entropy(h, W, torch.tensor([1, 3, -100, 7, 0, 2]),
                                                loss_dtype=None if torch.is_autocast_enabled("cpu") else torch.float32),
        [(6, 16), (11, 16)]),
    "flash_attention": (lambda q, k, v: flash_attention(q, k, v, causal=True), [(1, 2, 8, 16)] * 3),
}


def _same(name, ran, ref, out_dtype):
    """Outputs bitwise equal (in out_dtype, or the reference's), gradients equal and fp32 (None alike)."""
    (outs, grads), (ref_outs, ref_grads) = ran, ref
    for o, r in zip(outs, ref_outs):
        assert o.dtype == (out_dtype or r.dtype) and torch.equal(o, r), name
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None and r is None) or (g.dtype == torch.float32 and torch.equal(g, r)), (name, i)


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("name", list(MATMUL_OPS))
def test_matmul_ops_compute_in_the_autocast_dtype(name, amp):
    fn, shapes = MATMUL_OPS[name]
    leaves = _leaves(*shapes)
    _same(name, _run(fn, leaves, amp), _run(_cast_leaves(leaves, amp)(fn), leaves, None), None)


ELEMENTWISE_OPS = {
    "rms_norm": (lambda x, w: rms_norm(x, w), [(6, 16), (16,)]),
    "layer_norm": (lambda x, w, b: layer_norm(x, w, b), [(6, 16), (16,), (16,)]),
    "swiglu": (swiglu, [(6, 16), (6, 16)]),
    "geglu": (geglu, [(6, 16), (6, 16)]),
    "apply_rope": (lambda q, k, cos, sin: apply_rope(q, k, cos.detach(), sin.detach()),
                   [(1, 2, 5, 8), (1, 2, 5, 8), (1, 5, 8), (1, 5, 8)]),
    "cross_entropy": (lambda logits: cross_entropy(logits, torch.tensor([1, 3, -100, 7, 0, 2])), [(6, 11)]),
}


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("name", list(ELEMENTWISE_OPS))
def test_elementwise_ops_are_untouched_by_autocast(name, amp):
    fn, shapes = ELEMENTWISE_OPS[name]
    leaves = _leaves(*shapes)
    _same(name, _run(fn, leaves, amp), _run(fn, leaves, None), torch.float32)
