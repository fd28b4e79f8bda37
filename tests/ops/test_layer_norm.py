import pytest
import torch

from fastnlg.ops.layer_norm import layer_norm, layer_norm_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, grads_of, leaf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 64), (2, 3, 100), (7, 768), (3, 1), (2, 1000)]


def _check(device, dtype, x, w, b, non_contiguous=False, train=(True, True)):
    x, w = x.to(device), w.to(device)
    b = None if b is None else b.to(device)
    if non_contiguous:
        x = x.transpose(0, 1)
    dy = torch.randn(x.shape, device=device, dtype=dtype)

    def make(dt):
        return [leaf(x, dt), leaf(w, dt, train[0]), None if b is None else leaf(b, dt, train[1])]

    out, g = grads_of(lambda a, c, d: layer_norm(a, c, d, 1e-5), make(dtype), dy)
    ref, gr = grads_of(lambda a, c, d: layer_norm_reference(a, c, d, 1e-5), make(torch.float64), dy.double())
    low, gl = grads_of(lambda a, c, d: layer_norm_reference(a, c, d, 1e-5), make(dtype), dy)
    assert out.dtype == dtype
    for name, i in (("dx", 0), ("dw", 1), ("db", 2)):
        assert_by_rule(name, g[i], gl[i], gr[i], dtype)
    assert_by_rule("y", out, low, ref, dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, shape, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    C = shape[-1]
    _check(device, dtype, torch.randn(shape) * 2 + 1, torch.randn(C), torch.randn(C))


@pytest.mark.parametrize("device,backend", backend_params())
def test_no_bias_non_contiguous_frozen(device, backend, use_backend):
    use_backend(backend)
    _check(device, torch.float32, torch.randn(5, 6, 80), torch.randn(80), None, non_contiguous=True)
    _check(device, torch.float16, torch.randn(9, 48), torch.randn(48), torch.randn(48), train=(False, True))
    _check(device, torch.float32, torch.randn(9, 48), torch.randn(48), torch.randn(48), train=(True, False))


@pytest.mark.parametrize("device,backend", backend_params())
def test_empty_batch(device, backend, use_backend):
    use_backend(backend)
    x = torch.randn(0, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    layer_norm(x, w, b).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend, use_backend):
    use_backend(backend)
    ins = [torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True) for _ in range(1)]
    ins += [torch.randn(11, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, c, d: layer_norm(a, c, d, 1e-5), ins)


def test_bad_input():
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(9))
    with pytest.raises(TypeError, match="weight has dtype torch.int32"):
        layer_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.int32))


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, None), (torch.float64, None), (torch.float16, None),
                                                (torch.bfloat16, None), (torch.float32, torch.bfloat16)], ids=str)
def test_torch_backend_is_atens_layer_norm_called_directly(dtype, weight_dtype, use_backend, monkeypatch):
    """On the torch backend (the CPU default) the op is aten's layer norm in the accumulation dtype (casts
    around it for fp16/bf16, and for a weight of another dtype): called directly (C++ autograd, no Python
    Function), bit for bit what the custom op's torch backend gives, values and gradients."""
    from fastnlg.ops import _eager

    use_backend("torch")
    g = torch.Generator().manual_seed(0)
    ins = [(torch.randn(s, generator=g) * 3 + 1).to(d or dtype)
           for s, d in (((6, 5, 48), None), ((48,), weight_dtype), ((48,), weight_dtype))]
    dy = torch.randn(6, 5, 48, generator=g).to(dtype)

    def run():
        xs = [t.clone().requires_grad_() for t in ins]
        out = layer_norm(*xs, 1e-5)
        out.backward(dy)
        return out, [t.grad for t in xs]
    out, grads = run()
    assert out.dtype == dtype and [t.dtype for t in grads] == [t.dtype for t in ins]
    assert type(out.grad_fn).__name__ in ("NativeLayerNormBackward0", "ToCopyBackward0")
    monkeypatch.setattr(_eager, "_plain", lambda args: False)  # the registered custom op (torch backend)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # (what keeps compile on the custom op)
    ref, ref_grads = run()
    assert "fastnlg" in type(ref.grad_fn).__name__
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        assert torch.equal(a, b)
