import pytest
import torch

from fastnlg.ops.rope import apply_rope, apply_rope_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule, leaf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def hf_cos_sin(B, T, D, base=10000.0, offset=0):
    """cos/sin as Hugging Face's rotary embedding builds them (duplicated halves)."""
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    pos = torch.arange(offset, offset + T, dtype=torch.float32)[None].expand(B, T)
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos(), emb.sin()


def _check(device, dtype, q, k, cos, sin):
    q, k, cos, sin = (t.to(device) for t in (q, k, cos, sin))
    dq, dk = torch.randn(q.shape, device=device, dtype=dtype), torch.randn(k.shape, device=device, dtype=dtype)

    def run(fn, dt):
        a, b = leaf(q, dt), leaf(k, dt)
        oq, ok = fn(a, b, cos.to(dt), sin.to(dt))
        ga, gb = torch.autograd.grad((oq, ok), (a, b), (dq.to(dt), dk.to(dt)))
        return oq, ok, ga, gb

    ours, ref, low = run(apply_rope, dtype), run(apply_rope_reference, torch.float64), run(apply_rope_reference, dtype)
    for i, name in enumerate(("q", "k", "dq", "dk")):
        assert_by_rule(name, ours[i], low[i], ref[i], dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hk,T,D", [(1, 1, 1, 1, 8), (2, 4, 2, 7, 64), (1, 12, 3, 5, 128), (2, 3, 3, 3, 80)])
def test_matches_reference(device, backend, dtype, B, Hq, Hk, T, D, use_backend):
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    cos, sin = hf_cos_sin(B, T, D, offset=3)
    _check(device, dtype, torch.randn(B, Hq, T, D), torch.randn(B, Hk, T, D), cos, sin)


@pytest.mark.parametrize("device,backend", backend_params())
def test_strided_q_k_and_shared_cos(device, backend, use_backend):
    """q/k as HF makes them (view of (B, T, H, D) transposed), cos given as (T, D); generic (non-duplicated) cos."""
    use_backend(backend)
    B, T, H, D = 2, 6, 4, 32
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k = torch.randn(B, T, 2, D).transpose(1, 2)
    _check(device, torch.float32, q, k, torch.randn(T, D), torch.randn(T, D))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend, use_backend):
    use_backend(backend)
    q = torch.randn(2, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, cos, sin), (q, k))


def test_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = hf_cos_sin(2, 5, 16)
    for got, want in zip(apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 6, 16), *hf_cos_sin(2, 5, 16)), r"k must be \(B, Hk, T, D\)"),
    (lambda: (torch.randn(2, 4, 5, 15), torch.randn(2, 2, 5, 15), torch.randn(5, 15), torch.randn(5, 15)), "must be even"),
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(3, 5, 16), torch.randn(3, 5, 16)), "cos/sin must be"),
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(5, 16, requires_grad=True), torch.randn(5, 16)), "constants"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(*make())
