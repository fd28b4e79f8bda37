import pytest
import torch

from fastnlg.ops.rms_norm import rms_norm, rms_norm_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, grads_of, leaf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 64), (2, 3, 100), (7, 1000), (1, 4096), (3, 1)]


def _reference_check(device, dtype, x, w, offset=0.0, non_contiguous=False, train_w=True):
    x, w = x.to(device), w.to(device)
    if non_contiguous:
        x = x.transpose(0, 1)
    dy = torch.randn(x.shape, device=device, dtype=dtype)
    ins = [leaf(x, dtype), leaf(w, dtype, train_w)]
    out, g = grads_of(lambda a, b: rms_norm(a, b, 1e-6, offset), ins, dy)
    ref_in = [leaf(x, torch.float64), leaf(w, torch.float64, train_w)]
    ref, gr = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-6, offset), ref_in, dy.double())
    low_in = [leaf(x, dtype), leaf(w, dtype, train_w)]
    low, gl = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-6, offset), low_in, dy)
    assert out.dtype == dtype and out.shape == x.shape
    assert_by_rule("y", out, low, ref, dtype)
    assert_by_rule("dx", g[0], gl[0], gr[0], dtype)
    assert_by_rule("dw", g[1], gl[1], gr[1], dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, shape, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    C = shape[-1]
    _reference_check(device, dtype, torch.randn(shape) * 3, torch.randn(C))


@pytest.mark.parametrize("device,backend", backend_params())
def test_gemma_offset_non_contiguous_and_frozen_weight(device, backend, use_backend):
    use_backend(backend)
    _reference_check(device, torch.float32, torch.randn(6, 5, 96), torch.randn(96) * 0.1, offset=1.0, non_contiguous=True)
    _reference_check(device, torch.float16, torch.randn(4, 33), torch.randn(33), train_w=False)


@pytest.mark.parametrize("device,backend", backend_params())
def test_empty_batch(device, backend, use_backend):
    use_backend(backend)
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64, device=device))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend, use_backend):
    """The hand-derived backward, checked numerically in float64 (torch spec and C++ kernel)."""
    use_backend(backend)
    x = torch.randn(4, 3, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6, 0.5), (x, w))


def test_large_row_interpreter(use_backend):
    """A Llama-sized hidden (non power of two) through the Triton kernel, few rows."""
    use_backend("triton")
    _reference_check("cpu", torch.float32, torch.randn(2, 5120), torch.randn(5120))


def test_torch_compile_fullgraph():
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    compiled = torch.compile(lambda a, b: rms_norm(a, b) * 2, fullgraph=True, backend="aot_eager")
    compiled(x, w).sum().backward()
    ref_x, ref_w = leaf(x), leaf(w)
    (rms_norm_reference(ref_x, ref_w) * 2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(4, 8), torch.randn(7)), ValueError, r"weight must have shape \(8,\).*\(4, 8\)"),
    (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(8)), TypeError, "x has dtype torch.int64"),
    (lambda: ([1.0], torch.randn(8)), TypeError, "x must be a torch.Tensor"),
    (lambda: (torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "one device"),
])
def test_bad_input(make, err, match):
    x, w = make()
    with pytest.raises(err, match=match):
        rms_norm(x, w)


def test_forced_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("FASTNLG_BACKEND", "cuda")
    with pytest.raises(ValueError, match="not implemented for this op"):
        rms_norm(torch.randn(2, 8), torch.randn(8))
    monkeypatch.setenv("FASTNLG_BACKEND", "triton")
    with pytest.raises(ValueError, match="float64"):
        rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
