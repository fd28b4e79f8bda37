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


def test_forced_backend_that_cannot_run(backend_env):
    backend_env.setenv("FASTNLG_BACKEND_RMS_NORM", "cuda")
    with pytest.raises(ValueError, match=r"FASTNLG_BACKEND_RMS_NORM='cuda' is not implemented for this op"):
        rms_norm(torch.randn(2, 8), torch.randn(8))
    backend_env.delenv("FASTNLG_BACKEND_RMS_NORM")
    backend_env.setenv("FASTNLG_BACKEND", "triton")
    with pytest.raises(ValueError, match="float64"):
        rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))


def _family_norms(C, dtype, weight_dtype=None):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama, gemma = LlamaRMSNorm(C, eps=1e-6), GemmaRMSNorm(C, eps=1e-6)
    with torch.no_grad():
        llama.weight.copy_(torch.randn(C) * 0.5 + 1)
        gemma.weight.copy_(torch.randn(C) * 0.5)
    return llama.to(weight_dtype or dtype), gemma.to(weight_dtype or dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casting_modes_round_as_each_family(device, backend, dtype, use_backend):
    """casting_mode="llama" gives LlamaRMSNorm's bits (x_hat rounded before the multiply), "gemma" (offset 1)
    GemmaRMSNorm's; the other family's mode differs in about a quarter of the elements, so the test can fail."""
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    x = (torch.randn(64, 512) * 3).to(dtype).to(device)
    llama, gemma = (m.to(device) for m in _family_norms(512, dtype))
    with torch.no_grad():
        want_l, want_g = llama(x), gemma(x)
        ours_l = rms_norm(x, llama.weight, 1e-6, casting_mode="llama")
        ours_g = rms_norm(x, gemma.weight, 1e-6, offset=1.0, casting_mode="gemma")
        wrong_l = rms_norm(x, llama.weight, 1e-6, casting_mode="gemma")
    assert ours_l.dtype == want_l.dtype and ours_g.dtype == want_g.dtype
    assert (ours_l == want_l).float().mean() >= 0.999
    assert (ours_g == want_g).float().mean() >= 0.999  # the last ulp of rsqrt vs 1/sqrt, rarely
    assert (wrong_l == want_l).float().mean() < 0.9
    torch.testing.assert_close(ours_l, rms_norm_reference(x, llama.weight, 1e-6, casting_mode="llama"), atol=0, rtol=0.01)


@pytest.mark.parametrize("device,backend", backend_params())
def test_llama_mode_fp32_weight_promotes_as_eager(device, backend, use_backend):
    """bf16 activations with fp32 norm weights (PEFT's prepare_model_for_kbit_training): Llama's eager norm
    returns fp32 (weight * x_hat.to(bf16)), and so does casting_mode="llama"; gradients in each input's dtype."""
    use_backend(backend)
    dtype = torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16
    x = (torch.randn(6, 96) * 2).to(dtype).to(device)
    llama, _ = _family_norms(96, dtype, weight_dtype=torch.float32)
    llama = llama.to(device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = llama(xa)
    ours = rms_norm(xb, llama.weight, 1e-6, casting_mode="llama")
    assert ours.dtype == want.dtype == torch.float32
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-6)
    dy = torch.randn_like(want)
    gw_want = torch.autograd.grad(want, (xa, llama.weight), dy)
    gw_ours = torch.autograd.grad(ours, (xb, llama.weight), dy)
    for a, b in zip(gw_ours, gw_want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_weight_and_in_place(device, backend, dtype, use_backend):
    """rms_norm(x, None) is F.rms_norm without weight (forward and dx); inplace=True under no_grad writes
    the same values into x and returns x; with gradients required it refuses."""
    use_backend(backend)
    x = (torch.randn(5, 3, 70) * 2).to(device)
    dy = torch.randn(x.shape, device=device, dtype=dtype)
    out, g = grads_of(lambda a: rms_norm(a, None, 1e-6), [leaf(x, dtype)], dy)
    ref, gr = grads_of(lambda a: torch.nn.functional.rms_norm(a, (70,), None, 1e-6), [leaf(x, torch.float64)],
                       dy.double())
    low, gl = grads_of(lambda a: torch.nn.functional.rms_norm(a, (70,), None, 1e-6), [leaf(x, dtype)], dy)
    assert_by_rule("y", out, low, ref, dtype)
    assert_by_rule("dx", g[0], gl[0], gr[0], dtype)
    w = torch.randn(70, device=device, dtype=dtype)
    for mode in ("gemma", "llama"):
        xi = x.to(dtype).clone()
        with torch.no_grad():
            expect = rms_norm(xi, w, 1e-6, casting_mode=mode)
            got = rms_norm(xi, w, 1e-6, casting_mode=mode, inplace=True)
        assert got is xi and torch.equal(xi, expect), mode
    with pytest.raises(ValueError, match="inplace=True is for inference"):
        rms_norm(x.to(dtype).requires_grad_(), w, inplace=True)
    with pytest.raises(ValueError, match="inplace=True needs a contiguous x"):
        with torch.no_grad():
            rms_norm(x.to(dtype).transpose(0, 1), w, inplace=True)
    with pytest.raises(ValueError, match="offset=1.0 scales a weight"):
        rms_norm(x, None, offset=1.0)
    with pytest.raises(ValueError, match="casting_mode must be one of"):
        rms_norm(x, None, casting_mode="none")
