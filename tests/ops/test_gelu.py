"""gelu(x + bias) (GPT-2's MLP activation with c_fc's bias fused) on every backend against the fp64 spec by
the tolerance rule, fp64 gradcheck of the hand-derived backward, strided/empty inputs and bad input."""
import pytest
import torch

from fastnlg.ops import gelu
from fastnlg.ops.gelu import gelu_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, grads_of, leaf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = backend_params()


def _check(device, dtype, x, bias, approximate):
    x = x.to(device)
    dy = torch.randn(x.shape, device=device, dtype=dtype)
    inputs = [x] + ([] if bias is None else [bias.to(device)])

    def op(x, b=None):
        return gelu(x, b, approximate=approximate)

    def ref(x, b=None):
        return gelu_reference(x, b, approximate=approximate)
    out, g = grads_of(op, [leaf(t, dtype) for t in inputs], dy)
    r, gr = grads_of(ref, [leaf(t, torch.float64) for t in inputs], dy.double())
    low, gl = grads_of(ref, [leaf(t, dtype) for t in inputs], dy)
    assert out.dtype == dtype and out.shape == x.shape
    assert_by_rule("y", out, low, r, dtype)
    assert_by_rule("dx", g[0], gl[0], gr[0], dtype)
    if bias is not None:
        assert_by_rule("dbias", g[1], gl[1], gr[1], dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape,with_bias", [((1, 7), True), ((2, 5, 300), True), ((3000,), False)], ids=str)
def test_matches_reference(device, backend, dtype, approximate, shape, with_bias, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    bias = torch.randn(shape[-1]) if with_bias else None
    _check(device, dtype, torch.randn(shape) * 4, bias, approximate)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_and_empty(device, backend, use_backend):
    use_backend(backend)
    _check(device, torch.float32, torch.randn(6, 64)[:, :32], torch.randn(32), "tanh")
    _check(device, torch.float32, torch.randn(0, 8), torch.randn(8), "tanh")


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_cpp_each_isa_build(approximate, cpu_isa, use_backend):
    """Every x86-64 build of the C++ fp32 loops the machine has (the tanh form's exp is fastnlg's polynomial):
    the tolerance rule on row lengths that leave vector tails, with and without bias, and rows split over
    threads (more than one 4096-value block)."""
    use_backend("cpp")
    for shape in ((3000,), (2, 5, 301), (40, 333), (3, 4099)):
        _check("cpu", torch.float32, torch.randn(shape) * 4, torch.randn(shape[-1]), approximate)
        _check("cpu", torch.float32, torch.randn(shape) * 4, None, approximate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_low_precision_in_place_is_fp32_then_cast(dtype, cpu_isa):
    """The C++ loops read bf16/fp16 x, bias and dy in place and write y in that dtype: bit for bit the fp32
    computation on upcast copies cast with .to() (the bias gradient sums the fp32 dz), in every x86-64
    build, with and without a bias, NaN, inf and vector tails."""
    from fastnlg.ops.gelu import _bwd_cpp, _fwd_cpp

    x = (torch.randn(37, 301) * 4).to(dtype)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -30.0])
    b, dy = torch.randn(301).to(dtype), torch.randn(37, 301).to(dtype)
    for tanh in (True, False):
        for bias in (b, None):
            y, y32 = _fwd_cpp(x, bias, tanh), _fwd_cpp(x.float(), None if bias is None else bias.float(), tanh)
            assert y.dtype == dtype and torch.equal(y.isnan(), y32.isnan())
            assert torch.equal(y.nan_to_num(), y32.to(dtype).nan_to_num())
            (dx, db), (dx32, db32) = (_bwd_cpp(dy, x, bias, tanh, bias is not None),
                                      _bwd_cpp(dy.float(), x.float(), None if bias is None else bias.float(), tanh,
                                               bias is not None))
            assert torch.equal(dx.nan_to_num(), dx32.to(dtype).nan_to_num())
            if bias is not None:
                assert db.dtype == torch.float32 and torch.equal(db.nan_to_num(), db32.nan_to_num())


def test_cpp_is_the_cpu_default_for_tanh_only(backend_env):
    from fastnlg.ops.gelu import _backend_for

    backend_env.delenv("FASTNLG_BACKEND", raising=False)
    backend_env.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 8)
    assert _backend_for(x, True) == "cpp"
    assert _backend_for(x, False) == "torch"  # (aten's erf is vectorised, glibc's is not)


def test_cpp_large_and_non_finite_inputs(use_backend):
    """Far in the tails the polynomial exp saturates: gelu(z) is 0 or z there and the derivative 0 or 1,
    within the tolerance rule; inf and NaN follow F.gelu."""
    use_backend("cpp")
    z = torch.tensor([-1e4, -200.0, -30.0, -9.0, 0.0, 9.0, 30.0, 200.0, 1e4])
    _check("cpu", torch.float32, z, None, "tanh")
    special = torch.tensor([float("nan"), float("inf")])
    assert torch.equal(gelu(special).isnan(), torch.nn.functional.gelu(special, approximate="tanh").isnan())
    assert gelu(special)[1] == float("inf")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_fp64(backend, approximate, use_backend):
    use_backend(backend)
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: gelu(x, b, approximate=approximate), (x, b))
    assert torch.autograd.gradcheck(lambda x: gelu(x, approximate=approximate), (x,))


def test_one_rounding_is_closer_than_eager_bias_then_gelu(use_backend):
    """The fused op never rounds z = x + bias to bf16: closer to the fp64 spec than eager's two ops."""
    use_backend("torch")  # (the interpreter does not round bf16 as a GPU does)
    torch.manual_seed(0)
    x, b = torch.randn(256, 512, dtype=torch.bfloat16) * 3, torch.randn(512, dtype=torch.bfloat16)
    exact = gelu_reference(x.double(), b.double())
    ours = (gelu(x, b).double() - exact).abs().mean()
    eager = (torch.nn.functional.gelu(x + b, approximate="tanh").double() - exact).abs().mean()
    assert ours < eager


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, approximate="fast")
    with pytest.raises(ValueError, match="bias"):
        gelu(x, torch.randn(7))
    with pytest.raises((TypeError, ValueError), match="dtype"):
        gelu(x, torch.randn(8, dtype=torch.float64))
