"""flash_attention: the FA2 backward formulas vs autograd in fp64, the Triton kernels (interpreter on CPU,
the gpu tier on CUDA) vs the fp64 reference for every feature and their combinations, dropout, bad input."""
import math

import pytest
import torch

from fastnlg.ops.attention import attention_backward_reference, attention_reference, flash_attention
from tests.conftest import device_params
from tests.tolerance import assert_by_rule, eager_attention_lowp

DEVICES = device_params()


def _inputs(B, Hq, Hkv, T, S, D, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(T * 1000 + S)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa
    return mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(B, Hq, T, D)


def _features(B, S, device, kpm=False, varlen=None):
    kw = {}
    if kpm:
        m = torch.ones(B, S, dtype=torch.bool, device=device)
        m[0, : S // 3] = False  # left padding
        if B > 1:
            m[1, -2:] = False  # right padding
        kw["key_padding_mask"] = m
    if varlen:
        kw["cu_seqlens"] = torch.tensor(varlen, dtype=torch.int32, device=device)
    return kw


CASES = [  # (B, Hq, Hkv, T, S, D, options)
    (2, 2, 2, 17, 17, 32, {"causal": False}),
    (2, 2, 2, 17, 17, 32, {"causal": True}),
    (1, 4, 1, 5, 33, 16, {"causal": True}),                       # MQA, T < S (KV cache, bottom-right)
    (2, 4, 2, 33, 20, 40, {"causal": False}),                     # GQA, T > S, D padded to 64
    (2, 2, 1, 31, 31, 16, {"causal": True, "window": (7, -1)}),   # sliding window
    (2, 2, 2, 24, 24, 16, {"causal": False, "window": (3, 5)}),
    (1, 2, 2, 20, 20, 16, {"causal": True, "softcap": 2.0}),
    (2, 2, 1, 19, 19, 16, {"causal": True, "kpm": True}),
    (1, 2, 1, 41, 41, 16, {"causal": True, "varlen": [0, 7, 8, 30, 41]}),
    (2, 4, 2, 23, 23, 24, {"causal": True, "window": (6, -1), "softcap": 3.0, "kpm": True}),
    (1, 4, 2, 45, 45, 16, {"causal": True, "varlen": [0, 12, 13, 45], "window": (5, -1), "softcap": 2.5}),
    (1, 2, 2, 30, 30, 24, {"causal": False, "varlen": [0, 10, 30], "window": (4, 3)}),  # two-sided, packed
    (1, 2, 2, 1, 37, 16, {"causal": True}),                       # decode row
    (1, 2, 1, 18, 18, 96, {"causal": True}),                      # D = 96 padded to 128
    (1, 1, 1, 9, 9, 256, {"causal": False}),                      # the largest head dim
]


def _ids(case):
    B, Hq, Hkv, T, S, D, opt = case
    return f"B{B}-H{Hq}x{Hkv}-T{T}-S{S}-D{D}-" + ",".join(f"{k}={v}" for k, v in opt.items())


def _split(case, device):
    B, Hq, Hkv, T, S, D, opt = case
    opt = dict(opt)
    kw = _features(B, S, device, opt.pop("kpm", False), opt.pop("varlen", None))
    return B, Hq, Hkv, T, S, D, {**opt, **kw}


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward_formulas_match_autograd_fp64(case):
    """The FA2 backward (the kernels' algorithm) equals autograd of the spec, and the spec passes gradcheck."""
    B, Hq, Hkv, T, S, D, kw = _split(case, "cpu")
    q, k, v, do = _inputs(B, Hq, Hkv, T, S, D, "cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attention_reference(q, k, v, **kw)
    want = torch.autograd.grad(o, (q, k, v), do)
    got = attention_backward_reference(do, q.detach(), k.detach(), v.detach(), **kw)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=name)
    if T * S <= 400:
        small = [t.detach()[..., :4].clone().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, **kw), small)


def test_dropout_backward_formula_fp64():
    q, k, v, do = _inputs(1, 2, 1, 9, 9, 8, "cpu")
    keep = torch.rand(1, 2, 9, 9) >= 0.3
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attention_reference(q, k, v, dropout_p=0.3, dropout_mask=keep)
    want = torch.autograd.grad(o, (q, k, v), do)
    got = attention_backward_reference(do, q.detach(), k.detach(), v.detach(), dropout_p=0.3, dropout_mask=keep)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def _check_kernel(case, device, dtype, use_backend):
    use_backend("triton")
    B, Hq, Hkv, T, S, D, kw = _split(case, device)
    q64, k64, v64, do64 = _inputs(B, Hq, Hkv, T, S, D, device)
    leaves = lambda dt: [t.to(dt).requires_grad_() for t in (q64, k64, v64)]  # noqa: E731
    qo, ko, vo = leaves(dtype)
    out = flash_attention(qo, ko, vo, **kw)
    ours = (out, *torch.autograd.grad(out, (qo, ko, vo), do64.to(dtype)))
    qr, kr, vr = leaves(torch.float64)
    ref_o = attention_reference(qr, kr, vr, **kw)
    ref = (ref_o, *torch.autograd.grad(ref_o, (qr, kr, vr), do64))
    ql, kl, vl = leaves(dtype)
    low_o = eager_attention_lowp(ql, kl, vl, **kw)
    low = (low_o, *torch.autograd.grad(low_o, (ql, kl, vl), do64.to(dtype)))
    for name, o, l, r in zip(("out", "dq", "dk", "dv"), ours, low, ref):
        assert_by_rule(name, o, l, r, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_fp32(device, case, use_backend):
    _check_kernel(case, device, torch.float32, use_backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[9]], ids=_ids)
def test_kernel_fp16(device, case, use_backend):
    _check_kernel(case, device, torch.float16, use_backend)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("case", [CASES[3], CASES[9], CASES[10]], ids=_ids)
def test_kernel_any_tile_shape(tiles, case, use_backend, monkeypatch):
    """The tuner may pick any BLOCK_M x BLOCK_N of the tables (square or not): each gives the same attention
    (interpreter, where the tile shape is set by hand)."""
    from fastnlg.kernels import attention as kern

    monkeypatch.setattr(kern, "INTERPRET_CONFIG", (*tiles, 4, 1))
    _check_kernel(case, "cpu", torch.float32, use_backend)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(1, 2, 1, 1000, 1000, 16, {"causal": True, "window": (300, -1)}),
                                  (1, 2, 2, 999, 1000, 16, {"causal": False, "kpm": True})], ids=_ids)
def test_kernel_long_odd_lengths(device, case, use_backend):
    """Lengths of about 1000, not multiples of any block: many key blocks per row, partial last blocks."""
    _check_kernel(case, device, torch.float32, use_backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_head_dims_bf16_gpu(D, causal, use_backend):
    _check_kernel((2, 4, 2, 300, 300, D, {"causal": causal}), "cuda", torch.bfloat16, use_backend)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_statistics_and_backward(device, use_backend):
    """q = k = 0 makes P uniform (1/S) and v = I makes O = dropout(P): O * S * (1 - p) is the kernel's keep
    mask. Its keep rate is 1 - p, it differs per head, and the kernel's gradients equal the reference's
    computed with that same mask (backward reproduces forward's random numbers)."""
    use_backend("triton")
    p, S, H = 0.25, 64, 2
    q = torch.zeros(1, H, 48, S, device=device)
    k = torch.zeros(1, H, S, S, device=device)
    v = torch.eye(S, device=device).expand(1, H, S, S).contiguous()
    o = flash_attention(q, k, v, causal=False, dropout_p=p)
    keep = (o * S * (1 - p)).round()
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    rate = keep.mean().item()
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel()), rate
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep, (flash_attention(q, k, v, causal=False, dropout_p=p) * S * (1 - p)).round())

    torch.manual_seed(5)
    q, k, vv, do = _inputs(1, H, H, 48, S, S, device, torch.float32)
    v2 = torch.cat([torch.eye(S, device=device).expand(1, H, S, S), vv], dim=-1)  # columns :S expose the mask
    qk = [t.clone().requires_grad_() for t in (q, k)]
    qk_pad = [torch.cat([t, torch.zeros_like(t)], -1) for t in qk]  # D = 2S, scores unchanged
    v2 = v2.requires_grad_()
    torch.manual_seed(6)
    out = flash_attention(qk_pad[0], qk_pad[1], v2, causal=True, dropout_p=p)
    lse_free = attention_reference(q, k, torch.eye(S, device=device).expand(1, H, S, S), causal=True,
                                   softmax_scale=1 / math.sqrt(2 * S))
    mask = (out[..., :S] / lse_free.clamp_min(1e-30) * (1 - p)).round().bool() | (lse_free == 0)
    dout = torch.cat([torch.zeros_like(do), do], -1)
    ours = torch.autograd.grad(out, (*qk, v2), dout)
    r = [t.detach().double().requires_grad_() for t in (*qk, v2)]
    ref_o = attention_reference(torch.cat([r[0], torch.zeros_like(r[0])], -1),
                                torch.cat([r[1], torch.zeros_like(r[1])], -1), r[2], causal=True, dropout_p=p,
                                dropout_mask=mask)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-4, atol=1e-5)
    want = torch.autograd.grad(ref_o, r, dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), ours, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


def test_cpu_default_is_the_reference():
    q, k, v, _ = _inputs(1, 2, 1, 6, 6, 8, "cpu", torch.float32)
    torch.testing.assert_close(flash_attention(q, k, v), attention_reference(q, k, v))


def test_fully_masked_rows_give_zero():
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 8, "cpu", torch.float32)
    m = torch.tensor([[False, False, True, True]])
    out = attention_reference(q, k, v, causal=True, key_padding_mask=m)
    assert torch.all(out[0, 0, :2] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"k": (1, 2, 8, 16)}, r"share B and the head dim D"),
    ({"q": (1, 3, 8, 8), "k": (1, 2, 8, 8), "v": (1, 2, 8, 8)}, r"Hq=3 must be a multiple of kv heads Hkv=2"),
    ({"q": (1, 2, 8, 320), "k": (1, 2, 8, 320), "v": (1, 2, 8, 320)}, r"D=320 is above the supported 256"),
    ({"cu_seqlens": [0, 5, 3, 8]}, r"must start at 0, not decrease and end at the packed length 8"),
    ({"cu_seqlens": [0, 5, 7]}, r"end at the packed length 8"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ({"kpm": (1, 7)}, r"key_padding_mask must be bool \(B, S\) = \(1, 8\)"),
    ({"dtype": torch.int32}, r"dtype"),
])
def test_bad_input(kwargs, match):
    dtype = kwargs.get("dtype", torch.float32)
    q = torch.zeros(kwargs.get("q", (1, 2, 8, 8))).to(dtype)
    k = torch.zeros(kwargs.get("k", (1, 2, 8, 8))).to(dtype)
    v = torch.zeros(kwargs.get("v", kwargs.get("k", (1, 2, 8, 8)))).to(dtype)
    extra = {}
    if "cu_seqlens" in kwargs:
        extra["cu_seqlens"] = torch.tensor(kwargs["cu_seqlens"], dtype=torch.int32)
    if "kpm" in kwargs:
        extra["key_padding_mask"] = torch.ones(kwargs["kpm"], dtype=torch.bool)
    if "dropout_p" in kwargs:
        extra["dropout_p"] = kwargs["dropout_p"]
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **extra)


DECODE_CASES = [  # (B, Hq, Hkv, T, S, D, options): few query rows per kv head, a longer KV cache
    (2, 4, 1, 1, 150, 32, {"causal": True}),
    (1, 8, 2, 3, 97, 40, {"causal": True, "window": (20, -1), "softcap": 4.0}),
    (2, 2, 2, 1, 80, 16, {"causal": True, "kpm": True}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_ids)
@pytest.mark.parametrize("n_splits", [None, 1, 3])
def test_flash_decoding(device, case, n_splits, use_backend, monkeypatch):
    """Split-K decoding (no grad) equals the reference, for any number of key splits."""
    from fastnlg.kernels import attention_decode as kern

    use_backend("triton")
    B, Hq, Hkv, T, S, D, kw = _split(case, device)
    q, k, v, _ = _inputs(B, Hq, Hkv, T, S, D, device, torch.float32)
    assert kern.decode_eligible(q, k, 0.0, None)
    calls = []
    decode = kern.decode
    monkeypatch.setattr(kern, "decode", lambda *a, **k_: calls.append(1) or decode(*a, **k_, n_splits=n_splits))
    with torch.no_grad():
        out = flash_attention(q, k, v, **kw)
    assert calls
    ref = attention_reference(q.double(), k.double(), v.double(), **kw)
    low = eager_attention_lowp(q, k, v, **kw)
    assert_by_rule("out", out, low, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_path_is_chosen_by_the_documented_rule(device, use_backend, monkeypatch):
    """Evaluation (no_grad, or inputs that need no grad) of a decode-shaped call takes flash-decoding;
    training (inputs requiring grad) takes the FA2 kernel with a backward; decode=False / True override,
    and decode=True where a gradient is needed is an error, not a silent switch."""
    from fastnlg.kernels import attention_decode as kern

    use_backend("triton")
    B, Hq, Hkv, T, S, D, kw = _split(DECODE_CASES[0], device)
    q, k, v, _ = _inputs(B, Hq, Hkv, T, S, D, device, torch.float32)
    calls = []
    decode = kern.decode
    monkeypatch.setattr(kern, "decode", lambda *a, **k_: calls.append(1) or decode(*a, **k_))
    with torch.no_grad():
        flash_attention(q, k, v, **kw)
    assert len(calls) == 1
    flash_attention(q, k, v, **kw)  # grad mode on, but nothing requires grad: still inference
    assert len(calls) == 2
    with torch.no_grad():
        flash_attention(q, k, v, decode=False, **kw)
    assert len(calls) == 2
    qg = q.clone().requires_grad_()
    out = flash_attention(qg, k, v, **kw)
    assert len(calls) == 2 and out.grad_fn is not None
    out.sum().backward()
    assert qg.grad is not None
    with pytest.raises(ValueError, match="decode=True needs no gradient"):
        flash_attention(qg, k, v, decode=True, **kw)
    with pytest.raises(ValueError, match="decode-shaped"), torch.no_grad():
        flash_attention(q, q, q, decode=True, **kw)  # S == T: not a KV cache


@pytest.mark.parametrize("case", [c for c in CASES if "softcap" not in c[6]], ids=_ids)
def test_torch_backend_sdpa_path(case, use_backend):
    """The CPU default (SDPA with the spec's mask) against the fp64 spec, gradients included."""
    use_backend("torch")
    B, Hq, Hkv, T, S, D, kw = _split(case, "cpu")
    q64, k64, v64, do64 = _inputs(B, Hq, Hkv, T, S, D, "cpu")
    ours_in = [t.float().requires_grad_() for t in (q64, k64, v64)]
    out = flash_attention(*ours_in, **kw)
    ours = (out, *torch.autograd.grad(out, ours_in, do64.float()))
    ref_in = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref_o = attention_reference(*ref_in, **kw)
    ref = (ref_o, *torch.autograd.grad(ref_o, ref_in, do64))
    low_in = [t.float().requires_grad_() for t in (q64, k64, v64)]
    low_o = eager_attention_lowp(*low_in, **kw)
    low = (low_o, *torch.autograd.grad(low_o, low_in, do64.float()))
    for name, o, l, r in zip(("out", "dq", "dk", "dv"), ours, low, ref):
        assert_by_rule(name, o, l, r, torch.float32)
