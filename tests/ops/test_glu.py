import functools

import pytest
import torch

from fastnlg.ops.glu import geglu, geglu_reference, swiglu, swiglu_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, grads_of, leaf

OPS = {
    "swiglu": (swiglu, swiglu_reference),
    "geglu_tanh": (functools.partial(geglu, approximate="tanh"), functools.partial(geglu_reference, approximate="tanh")),
    "geglu_none": (functools.partial(geglu, approximate="none"), functools.partial(geglu_reference, approximate="none")),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(op, ref, device, dtype, gate, up):
    gate, up = gate.to(device), up.to(device)
    dy = torch.randn(gate.shape, device=device, dtype=dtype)
    out, g = grads_of(op, [leaf(gate, dtype), leaf(up, dtype)], dy)
    r, gr = grads_of(ref, [leaf(gate, torch.float64), leaf(up, torch.float64)], dy.double())
    low, gl = grads_of(ref, [leaf(gate, dtype), leaf(up, dtype)], dy)
    assert out.dtype == dtype and out.shape == gate.shape
    assert_by_rule("y", out, low, r, dtype)
    assert_by_rule("dgate", g[0], gl[0], gr[0], dtype)
    assert_by_rule("dup", g[1], gl[1], gr[1], dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 5, 300), (3000,)], ids=str)
def test_matches_reference(device, backend, dtype, name, shape, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    op, ref = OPS[name]
    _check(op, ref, device, dtype, torch.randn(shape) * 4, torch.randn(shape))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name", list(OPS))
def test_non_contiguous_and_empty(device, backend, name, use_backend):
    use_backend(backend)
    op, ref = OPS[name]
    both = torch.randn(4, 6, 64)
    _check(op, ref, device, torch.float32, both[..., :32], both[..., 32:])  # the fused gate_up split
    _check(op, ref, device, torch.float32, torch.randn(0, 8), torch.randn(0, 8))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_fp64(backend, name, use_backend):
    use_backend(backend)
    g = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS[name][0], (g, u))


def test_bad_input():
    with pytest.raises(ValueError, match=r"shapes must match, got gate \(2, 8\), up \(2, 9\)"):
        swiglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(TypeError, match="dtypes must match"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(torch.randn(2, 8), torch.randn(2, 8), approximate="erf")


def test_torch_compile_fullgraph():
    g, u = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    torch.compile(lambda a, b: swiglu(a, b).sum(), fullgraph=True, backend="aot_eager")(g, u).backward()
    g2, u2 = leaf(g), leaf(u)
    swiglu_reference(g2, u2).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)
