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
    # cos per batch row, sin one row broadcast over the batch (other strides than cos's), a q of rows wider
    # than D (a slice of a fused projection): outputs stay contiguous, as the fake implementation says
    cos, sin = torch.randn(B, T, D), torch.randn(1, T, D).expand(B, T, D)
    wide = torch.randn(B, T, H, D + 8)[..., 3:3 + D].transpose(1, 2)
    _check(device, torch.float32, wide, k, cos, sin)
    for out in apply_rope(wide.to(device), k.to(device), cos.to(device), sin.to(device)):
        assert out.is_contiguous()


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
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(5, 18), torch.randn(5, 18)), "R <= D=16"),
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(3, 5, 16), torch.randn(3, 5, 16)), "cos/sin must be"),
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(5, 16, requires_grad=True), torch.randn(5, 16)), "constants"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(*make())


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("R", [8, 6, 5], ids=["half", "even", "odd"])
def test_partial_rotary(device, backend, R, use_backend):
    """cos/sin narrower than the head (Phi-3's partial_rotary_factor): the first R dims turn, the rest pass
    through; against the fp64 spec (values and gradients), and Phi-3's own apply_rotary_pos_emb."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    use_backend(backend)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = hf_cos_sin(2, 5, R) if R % 2 == 0 else (torch.randn(2, 5, R), torch.randn(2, 5, R))
    _check(device, torch.float32, q, k, cos, sin)
    for got, want in zip(apply_rope(q.to(device), k.to(device), cos.to(device), sin.to(device)),
                         apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got.cpu(), want)
        assert torch.equal(got[..., R:].cpu(), q[..., R:] if got.shape == q.shape else k[..., R:])


@pytest.mark.parametrize("device,backend", backend_params())
def test_odd_head_dim(device, backend, use_backend):
    """An odd head dim rotates as HF's rotate_half splits it (at D // 2), instead of being refused."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    use_backend(backend)
    q, k = torch.randn(1, 3, 4, 15), torch.randn(1, 1, 4, 15)
    cos, sin = torch.randn(1, 4, 15), torch.randn(1, 4, 15)
    _check(device, torch.float32, q, k, cos, sin)
    for got, want in zip(apply_rope(q.to(device), k.to(device), cos.to(device), sin.to(device)),
                         apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got.cpu(), want)


@pytest.mark.parametrize("device,backend", backend_params())
def test_hf_arguments(device, backend, use_backend):
    """unsqueeze_dim=2 takes q, k as (B, T, H, D) like HF's; position_ids index a (max_pos, D) table, and are
    ignored (as HF ignores them) with per-batch cos/sin."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    use_backend(backend)
    B, T, D = 2, 5, 16
    q, k = torch.randn(B, T, 4, D, device=device), torch.randn(B, T, 2, D, device=device)
    cos, sin = (t.to(device) for t in hf_cos_sin(B, T, D))
    got = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    for a, b in zip(got, apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    table_cos, table_sin = (t[0] for t in hf_cos_sin(1, 40, D))
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]])
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    got = apply_rope(qh, kh, table_cos.to(device), table_sin.to(device), position_ids=pos.to(device))
    want = apply_rotary_pos_emb(qh, kh, table_cos.to(device)[pos], table_sin.to(device)[pos])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    same = apply_rope(qh, kh, cos, sin, position_ids=pos.to(device))
    for a, b in zip(same, apply_rope(qh, kh, cos, sin)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        apply_rope(qh, kh, cos, sin, unsqueeze_dim=0)


def test_partial_and_odd_gradcheck_fp64():
    q = torch.randn(2, 2, 3, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 9, dtype=torch.float64, requires_grad=True)
    for R in (4, 9):
        cos, sin = torch.randn(2, 3, R, dtype=torch.float64), torch.randn(2, 3, R, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, cos, sin), (q, k))
