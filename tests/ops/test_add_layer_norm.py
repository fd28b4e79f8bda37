"""add_layer_norm = layer_norm(x + residual): every backend against the fp64 spec by the tolerance rule (with and
without the sum output, mixed dtypes), fp64 gradcheck, the unused sum's gradient skipped, bad input."""
import importlib

import pytest
import torch

from fastnlg.ops import add_layer_norm
from fastnlg.ops.add_layer_norm import add_layer_norm_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, grads_of, leaf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 64), (2, 3, 100), (7, 768), (3, 1), (2, 1000)]


def _check(device, dtype, shape, *, residual_dtype=None, return_sum=False, bias=True, non_contiguous=False):
    g = torch.Generator().manual_seed(1)
    C = shape[-1]
    x, r = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)
    w, b = torch.randn(C, generator=g), (torch.randn(C, generator=g) if bias else None)
    if non_contiguous:
        x, r = x.transpose(0, 1), r.transpose(0, 1)
    out_dtype = torch.promote_types(dtype, residual_dtype or dtype)
    dy = torch.randn(x.shape, generator=g).to(out_dtype).to(device)
    ds = torch.randn(x.shape, generator=g).to(out_dtype).to(device)

    def make(dt, dt_r):
        return [leaf(x.to(device), dt), leaf(r.to(device), dt_r), leaf(w.to(device), dt),
                None if b is None else leaf(b.to(device), dt)]

    def run(fn, ins, dys):
        if not return_sum:
            return grads_of(lambda *a: fn(*a, eps=1e-5), ins, dys[0])
        return grads_of(lambda *a: fn(*a, eps=1e-5, return_sum=True), ins, dys)

    dys = (dy, ds)
    out, gr = run(add_layer_norm, make(dtype, residual_dtype or dtype), dys)
    ref, g64 = run(add_layer_norm_reference, make(torch.float64, torch.float64), tuple(t.double() for t in dys))
    low, gl = run(add_layer_norm_reference, make(dtype, residual_dtype or dtype), dys)
    outs, refs, lows = (out, ref, low) if return_sum else ((out,), (ref,), (low,))
    for name, o, lo, r64 in zip(("y", "sum"), outs, lows, refs):
        assert o.dtype == out_dtype, (name, o.dtype)
        assert_by_rule(name, o, lo, r64, out_dtype)
    for name, i in (("dx", 0), ("dresidual", 1), ("dw", 2), ("db", 3)):
        if gr[i] is not None:
            assert gr[i].dtype == (make(dtype, residual_dtype or dtype)[i].dtype)
        assert_by_rule(name, gr[i], gl[i], g64[i], dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, shape, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    _check(device, dtype, shape)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_output_and_its_gradient(device, backend, dtype, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    _check(device, dtype, (4, 5, 96), return_sum=True)
    _check(device, dtype, (5, 6, 40), return_sum=True, bias=False, non_contiguous=True)


@pytest.mark.parametrize("device,backend", backend_params())
def test_mixed_dtypes(device, backend, use_backend):
    """BERT under autocast: the dense output is fp16/bf16, the residual (a LayerNorm's output) fp32; the sum
    and y are fp32, as eager's add promotes."""
    use_backend(backend)
    _check(device, torch.float16, (3, 7, 64), residual_dtype=torch.float32, return_sum=True)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in ((3, 4, 11), (3, 4, 11),
                                                                                         (11,), (11,))]
    assert torch.autograd.gradcheck(lambda *a: add_layer_norm(*a, eps=1e-5), ins)
    assert torch.autograd.gradcheck(lambda *a: add_layer_norm(*a, eps=1e-5, return_sum=True), ins)


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] != "torch"])
def test_unused_sum_gets_no_gradient_pass(device, backend, use_backend, monkeypatch):
    """Without return_sum the backward runs with no sum gradient (not a zero tensor read row by row)."""
    mod_ = importlib.import_module("fastnlg.ops.add_layer_norm")  # (the package exports the function by that name)
    use_backend(backend)
    seen = []
    real = mod_._BWD[backend]
    monkeypatch.setitem(mod_._BWD, backend, lambda *a: seen.append(a[-1]) or real(*a))
    x = torch.randn(4, 32, device=device, requires_grad=True)
    r = torch.randn(4, 32, device=device, requires_grad=True)
    w, b = torch.randn(32, device=device), torch.randn(32, device=device)
    add_layer_norm(x, r, w, b).sum().backward()
    y, s = add_layer_norm(x, r, w, b, return_sum=True)
    (y.sum() + s.sum()).backward()
    assert seen[0] is None and seen[1] is not None
    assert torch.equal(x.grad, r.grad)


@pytest.mark.parametrize("device,backend", backend_params())
def test_empty_batch(device, backend, use_backend):
    use_backend(backend)
    x = torch.randn(0, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    add_layer_norm(x, x.detach().clone(), w, b).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_bad_input():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"residual \(2, 9\) must have x's shape \(2, 8\)"):
        add_layer_norm(x, torch.randn(2, 9), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        add_layer_norm(x, x, w, torch.randn(9))
    with pytest.raises(TypeError, match="fp64 goes with fp64 only"):
        add_layer_norm(x, x.double(), w)
    with pytest.raises(TypeError, match="residual has dtype torch.int64"):
        add_layer_norm(x, torch.ones(2, 8, dtype=torch.int64), w)


def test_torch_fast_path_equals_the_custom_op(use_backend, monkeypatch):
    """The torch backend's eager path (aten's add and layer norm, C++ autograd) gives bit for bit what the
    registered custom op's torch backend gives: values and gradients of x, residual, weight, bias."""
    from fastnlg.ops import _eager

    use_backend("torch")
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(s, generator=g).to(d) for s, d in (((6, 5, 48), torch.bfloat16), ((6, 5, 48), torch.float32),
                                                          ((48,), torch.float32), ((48,), torch.float32))]
    dys = (torch.randn(6, 5, 48, generator=g), torch.randn(6, 5, 48, generator=g))

    def run():
        xs = [t.clone().requires_grad_() for t in ins]
        y, s = add_layer_norm(*xs, eps=1e-5, return_sum=True)
        torch.autograd.backward([y, s], list(dys))
        return [y, s], [t.grad for t in xs]
    outs, grads = run()
    assert "fastnlg" not in type(outs[0].grad_fn).__name__
    monkeypatch.setattr(_eager, "_plain", lambda args: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    refs, ref_grads = run()
    assert "fastnlg" in type(refs[0].grad_fn).__name__
    for a, b in zip([*outs, *grads], [*refs, *ref_grads]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_is_eagers_add_bit_for_bit(device, backend, dtype, use_backend):
    """The sum is x + residual rounded once to their dtype, as eager's add: equal bit for bit."""
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(6, 200, generator=g).mul(4).to(dtype).to(device) for _ in range(2))
    _, s = add_layer_norm(x, r, torch.ones(200, device=device, dtype=dtype), return_sum=True)
    assert torch.equal(s, x + r)
