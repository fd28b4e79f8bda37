"""gelu(x + bias) (GPT-2's MLP activation with c_fc's bias fused) on every backend against the fp64 spec by
the tolerance rule, fp64 gradcheck of the hand-derived backward, strided/empty inputs and bad input."""
import pytest
import torch

from fastnlg.ops import gelu
from fastnlg.ops.gelu import gelu_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, grads_of, leaf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = [p for p in backend_params() if p.values[1] != "cpp"]  # (no C++ kernel: aten's is the CPU default)


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
def test_gradcheck_fp64(approximate, use_backend):
    use_backend("torch")
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
