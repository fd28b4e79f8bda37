"""The tolerance rule of DESIGN.md §4.6, used by every op test:

    max|ours - ref64| <= 2 * max|torch_lowp - ref64| + atol * max(1, max|ref64|)

`ref64` is the op computed in float64; `torch_lowp` is plain PyTorch in the test's dtype (the error any
implementation in that precision makes). atol is small and per dtype, never widened per test; it scales
with the reference's magnitude above 1, since a value of 100 cannot be resolved below its ulp.
"""
import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_by_rule(name: str, ours, lowp, ref64, dtype=None):
    if ours is None and ref64 is None:
        return
    assert ours is not None and ref64 is not None, f"{name}: one side is None"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    dtype = dtype or ours.dtype
    ours64, ref64 = ours.detach().double().cpu(), ref64.detach().double().cpu()
    lowp_err = (lowp.detach().double().cpu() - ref64).abs().max().item() if ref64.numel() else 0.0
    err = (ours64 - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * lowp_err + ATOL[dtype] * scale
    assert torch.isfinite(ours64).all(), f"{name}: non-finite values"
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
