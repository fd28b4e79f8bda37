"""fused_linear_logprobs: per-token log p(label) and entropy of hidden @ weight.T (+ bias) without the logits,
against the reference in fp64 (the tolerance rule) on every backend, its backward by fp64 gradcheck, odd
sizes, ignored rows, temperature, the frozen-head path (no recompute), autocast, torch.compile, bad input."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastnlg.ops import fused_linear_logprobs
from fastnlg.ops.fused_linear_logprobs import fused_linear_logprobs_reference as reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.ops.test_cross_entropy import _data as linear_loss_data
from tests.tolerance import assert_by_rule

BACKENDS = backend_params()
LP = importlib.import_module("fastnlg.ops.fused_linear_logprobs")  # (fastnlg.ops.<name> is the function)


def _data(N, V, C, device="cpu", ignore_frac=0.3):
    """(hidden, weight, bias, labels) as the fused loss's tests draw them."""
    return linear_loss_data(N, V, C, device, ignore_frac)


def _run(fn, h, w, b, y, dtype, frozen, temperature, ga, gb, **kw):
    """Outputs and gradients of fn; the loss weights logp by ga and the entropy by gb (None: unused)."""
    h = h.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_(not frozen)
    b = b.detach().to(dtype).requires_grad_(not frozen)
    logp, ent = fn(h, w, y, bias=b, temperature=temperature, return_entropy=True, **kw)
    loss = (logp * ga.to(logp.dtype)).sum() + (0 if gb is None else (ent * gb.to(ent.dtype)).sum())
    loss.backward()
    return logp, ent, h.grad, w.grad, b.grad


def _check(device, dtype, N, V, C, frozen=False, temperature=1.0, entropy_grad=True, chunk=None, ignore_frac=0.3):
    h, w, b, y = _data(N, V, C, device, ignore_frac)
    ga = torch.rand(N, device=device)
    gb = torch.rand(N, device=device) if entropy_grad else None
    ours = _run(fused_linear_logprobs, h, w, b, y, dtype, frozen, temperature, ga, gb, chunk_size=chunk)
    ref = _run(reference, h, w, b, y, torch.float64, frozen, temperature, ga.double(),
               None if gb is None else gb.double())
    low = _run(reference, h, w, b, y, dtype, frozen, temperature, ga, gb)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, o, r, lo in zip(("logp", "entropy", "dh", "dw", "db"), ours, ref, low):
        assert_by_rule(name, o, lo, r, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-head", "frozen-head"])
@pytest.mark.parametrize("temperature,entropy_grad", [(1.0, False), (0.7, True)], ids=["T1", "T0.7-entropy"])
def test_matches_reference(device, backend, frozen, temperature, entropy_grad, use_backend):
    use_backend(backend)
    _check(device, torch.float32, 37, 1000, 16, frozen, temperature, entropy_grad, chunk=8)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-head", "frozen-head"])
def test_low_precision(device, backend, dtype, frozen, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    _check(device, dtype, 40, 700, 32, frozen, 0.9, True, chunk=16)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("N,V,C,chunk,ignore", [(1, 1, 8, None, 0.0), (1, 50, 3, None, 0.0), (9, 5000, 7, 4, 0.3),
                                                (6, 33, 5, 2, 1.0), (0, 10, 4, None, 0.0)])
def test_odd_sizes_and_all_ignored(device, backend, N, V, C, chunk, ignore, use_backend):
    """V = 5000 spans two of the Triton kernel's 4096-wide tiles; ignore 1.0: every row ignored (0 and no gradient)."""
    use_backend(backend)
    _check(device, torch.float32, N, V, C, chunk=chunk, ignore_frac=ignore)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-head", "frozen-head"])
def test_gradcheck_fp64(backend, frozen, use_backend):
    use_backend(backend)
    h, w, b, y = (t.double() if t.is_floating_point() else t for t in _data(6, 11, 4))
    h.requires_grad_()
    w.requires_grad_(not frozen)
    b.requires_grad_(not frozen)

    def f(h, w, b):
        logp, ent = fused_linear_logprobs(h, w, y, bias=b, temperature=0.8, return_entropy=True, chunk_size=4)
        return logp, ent

    assert torch.autograd.gradcheck(f, (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: f(h, w, b)[0], (h, w, b))  # the entropy unused


def test_reference_matches_torch():
    """The spec is log_softmax / -sum p log p on the logits, as TRL's selective_log_softmax and entropy."""
    h, w, b, y = _data(10, 30, 6, ignore_frac=0.0)
    logits = F.linear(h, w, b) / 2.0
    logp, ent = reference(h, w, y, bias=b, temperature=2.0, return_entropy=True)
    torch.testing.assert_close(logp, -F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits).entropy())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_vocabulary_and_nan(device, backend, use_backend):
    """-inf logits (a masked vocabulary) add nothing to the entropy or the gradient; a NaN logit makes its row
    NaN and leaves the others alone."""
    use_backend(backend)
    h, w, b, y = _data(4, 5000, 8, device, ignore_frac=0.0)
    b = b.clone()
    b[:4096] = float("-inf")
    y = torch.randint(4096, 5000, (4,), device=device)
    hh = h.clone().requires_grad_()
    logp, ent = fused_linear_logprobs(hh, w, y, bias=b, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    ref_logp, ref_ent = reference(h.double(), w.double(), y, bias=b.double(), return_entropy=True)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(hh.grad).all()
    b_bad = b.clone()
    b_bad[4500] = float("nan")
    logits = torch.cat([torch.randn(1, 5000, device=device), F.linear(h, w, b_bad)[1:]])  # row 0 clean
    out = fused_linear_logprobs(logits, torch.eye(5000, device=device), y)  # (the identity head: logits as given)
    assert torch.isfinite(out[0]) and torch.isnan(out[1:]).all()


def test_frozen_head_backward_recomputes_nothing(monkeypatch):
    """With the head frozen and only logp used, the forward keeps d logp / dh and backward scales it: no chunk
    pass (no matmul) in backward. With the head trainable, backward recomputes once."""
    calls = []
    real = LP._pass
    monkeypatch.setattr(LP, "_pass", lambda *a: calls.append(a[7] is not None or a[8] is not None) or real(*a))
    h, w, b, y = _data(12, 40, 8)
    for frozen, expected in ((True, [True]), (False, [False, True])):
        calls.clear()
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen)
        logp, ent = fused_linear_logprobs(hh, ww, y, return_entropy=True)
        logp.sum().backward()
        assert calls == expected, (frozen, calls)
    calls.clear()
    with torch.no_grad():
        fused_linear_logprobs(h.requires_grad_(), w, y)
    assert calls == [False]


def test_autocast_bf16_on_fp32_weights():
    """Under CPU bf16 autocast the matmul runs in bf16 (as F.linear would) and the outputs are fp32; fp32
    gradients reach the fp32 parameters."""
    h, w, b, y = _data(16, 300, 32)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_linear_logprobs(hh, ww, y, bias=b)
        ref = reference(h.bfloat16(), w.bfloat16(), y, bias=b.bfloat16())
    logp.sum().backward()
    assert logp.dtype == torch.float32 and ww.grad.dtype == torch.float32
    assert_by_rule("logp", logp, ref, reference(h.double(), w.double(), y, bias=b.double()), torch.bfloat16)


def test_torch_compile_fullgraph():
    h, w, b, y = _data(10, 50, 8)

    def f(h, w):
        logp, ent = fused_linear_logprobs(h, w, y, bias=b, temperature=0.5, return_entropy=True)
        return logp.sum() + 0.1 * ent.sum()

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(hh, ww).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    f(h2, w2).backward()
    torch.testing.assert_close(hh.grad, h2.grad)
    torch.testing.assert_close(ww.grad, w2.grad)


def test_bad_input():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100])
    with pytest.raises(ValueError, match=r"1 label\(s\) outside \[0, 10\).*row 2: 10"):
        fused_linear_logprobs(h, w, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match=r"hidden \(N, C\) = \(4, 8\) and weight \(V, C\) = \(10, 7\)"):
        fused_linear_logprobs(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match=r"labels \(3,\) must have one entry per row"):
        fused_linear_logprobs(h, w, y[:3])
    with pytest.raises(TypeError, match="dtypes must match"):
        fused_linear_logprobs(h, w.half(), y)
    with pytest.raises(ValueError, match=r"bias \(9,\) must have V = 10"):
        fused_linear_logprobs(h, w, y, bias=torch.randn(9))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        fused_linear_logprobs(h, w, y, temperature=0)
    with pytest.raises(TypeError, match="labels has dtype torch.float32"):
        fused_linear_logprobs(h, w, y.float())
