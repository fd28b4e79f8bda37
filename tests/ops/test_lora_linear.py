"""lora_linear: gradcheck in fp64, dense and NF4 bases on every backend against the reference, dropout replayed
in backward, PEFT's own LoraLayer on the same weights, what is saved for backward, bad input."""
import pytest
import torch

from fastnlg import backend
from fastnlg.ops.lora_linear import lora_linear, lora_linear_reference
from fastnlg.quant import quantize_nf4
from tests.conftest import backend_params
from tests.tolerance import assert_by_rule

BACKENDS = [p for p in backend_params() if p.values[1] != "cpp"]


def _params(d_in, d_out, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)  # noqa
    return (mk(d_out, d_in, scale=d_in ** -0.5), mk(r, d_in, scale=d_in ** -0.5), mk(d_out, r, scale=0.1),
            mk(d_out, scale=0.1))


def test_gradcheck_fp64():
    W, A, B, b = _params(7, 5, 3, torch.float64)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    A, B, b = (t.requires_grad_() for t in (A, B, b))
    assert torch.autograd.gradcheck(lambda x_, a, bb, c: lora_linear(x_, W, a, bb, scaling=1.7, bias=c), (x, A, B, b))


def _grads(fn, x, A, B, b, dy):
    x, A, B, b = (t.detach().clone().requires_grad_() for t in (x, A, B, b))
    y = fn(x, A, B, b)
    return (y, *torch.autograd.grad(y, (x, A, B, b), dy.to(y.dtype)))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_against_reference(device, backend, base, dtype, use_backend):
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("interpreter: fp32 only (bf16 is not GPU arithmetic there; fp16 dot is slow)")
    use_backend(backend)
    d_in, d_out, r = 96, 80, 8  # in, out not multiples of the NF4 block or of the tiles
    W64, A, B, b = _params(d_in, d_out, r, torch.float64, device)
    weight = quantize_nf4(W64.to(dtype), 64) if base == "nf4" else W64.to(dtype)
    w_ref = weight.dequantize(torch.float64) if base == "nf4" else W64
    x = torch.randn(3, 11, d_in, dtype=torch.float64, device=device)
    dy = torch.randn(3, 11, d_out, dtype=torch.float64, device=device)
    s = 16 / r ** 0.5  # rsLoRA scaling alpha / sqrt(r)

    ours = _grads(lambda x_, a, bb, c: lora_linear(x_, weight, a, bb, scaling=s, bias=c),
                  *(t.to(dtype) for t in (x, A, B, b)), dy)
    ref = _grads(lambda x_, a, bb, c: lora_linear_reference(x_, w_ref, a, bb, scaling=s, bias=c), x, A, B, b, dy)
    w_low = weight.dequantize(dtype) if base == "nf4" else weight
    low = _grads(lambda x_, a, bb, c: lora_linear_reference(x_, w_low, a, bb, scaling=s, bias=c),
                 *(t.to(dtype) for t in (x, A, B, b)), dy)
    for name, o, l, rr in zip(("y", "dx", "dA", "dB", "db"), ours, low, ref):
        assert_by_rule(name, o, l, rr, dtype)


def test_dropout_mask_replayed_in_backward():
    """Forward and backward use the same keep mask (regenerated from a seed, never stored)."""
    from fastnlg.ops.lora_linear import _dropout_mask

    W, A, B, b = _params(32, 24, 4, torch.float64)
    x = torch.randn(5, 32, dtype=torch.float64)
    dy = torch.randn(5, 24, dtype=torch.float64)
    torch.manual_seed(11)
    ours = _grads(lambda x_, a, bb, c: lora_linear(x_, W, a, bb, scaling=2.0, bias=c, dropout_p=0.3), x, A, B, b, dy)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = _dropout_mask(seed, (5, 32), 0.3, torch.device("cpu"))
    assert 0.5 < mask.float().mean() < 0.9
    ref = _grads(lambda x_, a, bb, c: lora_linear_reference(x_, W, a, bb, scaling=2.0, bias=c, dropout_p=0.3,
                                                             dropout_mask=mask), x, A, B, b, dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


def _adapters(d_in, d_out, ranks, dtype, device="cpu"):
    g = torch.Generator().manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa
    return [mk(r, d_in) * d_in ** -0.5 for r in ranks], [mk(d_out, r) * 0.1 for r in ranks]


def test_gradcheck_several_adapters_fp64():
    """Three adapters of different ranks and scalings sum as PEFT's active adapters do; none = the base layer."""
    W, _, _, b = _params(7, 5, 3, torch.float64)
    As, Bs = _adapters(7, 5, [3, 1, 2], torch.float64)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    ts = [t.requires_grad_() for t in (*As, *Bs, b)]
    fn = lambda x_, *t: lora_linear(x_, W, t[:3], t[3:6], scaling=[1.7, 0.5, 2.0], bias=t[6])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *ts))
    torch.testing.assert_close(fn(x, *ts), lora_linear_reference(x, W, As, Bs, scaling=[1.7, 0.5, 2.0], bias=b))
    assert torch.autograd.gradcheck(lambda x_, c: lora_linear(x_, W, [], [], scaling=[], bias=c), (x, b))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_several_adapters_against_reference(device, backend, base, use_backend):
    """NF4 on Triton adds all adapters in the matmul epilogue as one rank-sum(r_i) term."""
    use_backend(backend)
    d_in, d_out, ranks, ss = 96, 80, [8, 4], [2.0, 0.25]
    W64 = _params(d_in, d_out, 1, torch.float64, device)[0]
    weight = quantize_nf4(W64.float(), 64) if base == "nf4" else W64.float()
    As, Bs = _adapters(d_in, d_out, ranks, torch.float32, device)
    x = torch.randn(2, 9, d_in, device=device)
    dy = torch.randn(2, 9, d_out, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, *As, *Bs)]
    y = lora_linear(leaves[0], weight, leaves[1:3], leaves[3:], scaling=ss)
    ours = (y, *torch.autograd.grad(y, leaves, dy))
    w64 = weight.dequantize(torch.float64) if base == "nf4" else W64
    leaves64 = [t.double().requires_grad_() for t in (x, *As, *Bs)]
    y64 = lora_linear_reference(leaves64[0], w64, leaves64[1:3], leaves64[3:], scaling=ss)
    ref = (y64, *torch.autograd.grad(y64, leaves64, dy.double()))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4)


def test_several_adapters_each_with_its_own_dropout_mask():
    """Each adapter draws its own mask (seeds in adapter order), and backward replays each."""
    from fastnlg.ops.lora_linear import _dropout_mask

    W = _params(32, 24, 1, torch.float64)[0]
    As, Bs = _adapters(32, 24, [4, 2, 3], torch.float64)
    ps = [0.3, 0.0, 0.5]
    x = torch.randn(5, 32, dtype=torch.float64)
    dy = torch.randn(5, 24, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, *As, *Bs)]
        y = fn(leaves[0], leaves[1:4], leaves[4:])
        return (y, *torch.autograd.grad(y, leaves, dy))
    torch.manual_seed(3)
    ours = grads(lambda x_, a, b: lora_linear(x_, W, a, b, scaling=[2.0, 1.0, 0.5], dropout_p=ps))
    torch.manual_seed(3)
    seeds = [int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else None for p in ps]
    masks = [None if s is None else _dropout_mask(s, (5, 32), p, torch.device("cpu")) for s, p in zip(seeds, ps)]
    assert not torch.equal(masks[0], masks[2])
    ref = grads(lambda x_, a, b: lora_linear_reference(x_, W, a, b, scaling=[2.0, 1.0, 0.5], dropout_p=ps,
                                                       dropout_mask=masks))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


def _peft_layer(d_in, d_out, r, alpha, use_rslora, bias):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=bias))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0, use_rslora=use_rslora,
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    return model, model.base_model.model[0]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_layer(use_rslora):
    model, layer = _peft_layer(48, 40, 8, 32, use_rslora, bias=True)
    x = torch.randn(4, 6, 48, requires_grad=True)
    y_peft = model(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x2 = x.detach().clone().requires_grad_()
    y = lora_linear(x2, layer.base_layer.weight.detach(), A, B, scaling=layer.scaling["default"],
                    bias=layer.base_layer.bias.detach())
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    g_peft = torch.autograd.grad(y_peft, (x, A, B), dy)
    g_ours = torch.autograd.grad(y, (x2, A, B), dy)
    for a, b in zip(g_ours, g_peft):  # the same math in a different fp32 summation order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _saved_bytes(fn, x):
    """Bytes autograd saves for backward that are not x's own storage (x is the caller's, shared)."""
    seen = []

    def pack(t):
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            seen.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen)


def test_saves_less_than_peft():
    """PEFT (with lora_dropout) saves its dropout output and more per adapter; ours saves x A^T (N x r) plus
    the adapter weights, and regenerates the mask."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False))
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.1))
    layer = model.base_model.model[0]
    x = torch.randn(64, 256, requires_grad=True)
    theirs = _saved_bytes(model, x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ours = _saved_bytes(lambda t: lora_linear(t, layer.base_layer.weight.detach(), A, B, scaling=2.0, dropout_p=0.1), x)
    assert ours <= 64 * 8 * 4 + A.numel() * 4 + B.numel() * 4
    assert ours < theirs, (ours, theirs)


@pytest.mark.parametrize("kwargs,match", [
    ({"A": (4, 30)}, r"shapes do not chain"),
    ({"B": (20, 5)}, r"shapes do not chain"),
    ({"bias": (7,)}, r"bias \(7,\) must have out = 20"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ({"adtype": torch.float64}, r"must share a dtype"),
    ({"wgrad": True}, r"base weight is frozen"),
    ({"several": ([(4, 32), (2, 32)], [(20, 4), (20, 3)])}, r"lora_A\[1\] \(r, in\) \(2, 32\), lora_B\[1\]"),
    ({"several": ([(4, 32)], [(20, 4), (20, 4)])}, r"1 lora_A, 2 lora_B"),
])
def test_bad_input(kwargs, match):
    x = torch.randn(3, 32)
    W = torch.randn(20, 32, requires_grad=kwargs.get("wgrad", False))
    A = torch.randn(*kwargs.get("A", (4, 32)), dtype=kwargs.get("adtype", torch.float32))
    B = torch.randn(*kwargs.get("B", (20, 4)))
    bias = torch.randn(*kwargs["bias"]) if "bias" in kwargs else None
    if "several" in kwargs:
        A, B = ([torch.randn(*shape) for shape in shapes] for shapes in kwargs["several"])
    with pytest.raises(ValueError, match=match):
        lora_linear(x, W, A, B, scaling=1.0, bias=bias, dropout_p=kwargs.get("dropout_p", 0.0))


def test_nf4_row_chunks_any_alignment(monkeypatch, use_backend):
    """The CPU NF4 path dequantises row blocks through the NF4 backend on the quantisation blocks covering
    them, whether or not a row block starts on a block boundary; both equal the whole dequantised weight."""
    import importlib

    mod = importlib.import_module("fastnlg.ops.lora_linear")  # the module (fastnlg.ops.lora_linear is the function)

    use_backend("torch")
    monkeypatch.setattr(importlib.import_module("fastnlg.quant.matmul"), "DEQUANT_CHUNK_BYTES", 3 * 40 * 20)  # ~3 rows
    # per chunk: blocks straddle rows
    W = torch.randn(10, 40)
    w = quantize_nf4(W, 64, False)
    x = torch.randn(4, 40)
    torch.testing.assert_close(mod.base_matmul(x, w), x @ w.dequantize().t())
    dy = torch.randn(4, 10)
    torch.testing.assert_close(mod.base_matmul_t(dy, w), dy @ w.dequantize())


def test_triton_nf4_adds_lora_in_the_epilogue(monkeypatch, use_backend):
    """On Triton the NF4 forward is one kernel writing y once (no separate base matmul + addmm)."""
    import importlib

    nf4mm = importlib.import_module("fastnlg.kernels.nf4_matmul")
    use_backend("triton")
    calls, matmul_nt = [], nf4mm.matmul_nt
    monkeypatch.setattr(nf4mm, "matmul_nt", lambda *a, **k: calls.append(k.get("lora_u")) or matmul_nt(*a, **k))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not fused")))
    W, A, B, b = _params(48, 40, 4, torch.float32)
    w = quantize_nf4(W, 64, True)
    x = torch.randn(6, 48)
    y = lora_linear(x, w, A, B, scaling=1.5, bias=b)
    monkeypatch.undo()  # (FASTNLG_BACKEND too: the settings are re-read)
    backend.refresh()
    assert len(calls) == 1 and calls[0] is not None  # one kernel, the LoRA term in it
    torch.testing.assert_close(y, lora_linear_reference(x, w, A, B, scaling=1.5, bias=b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tiles", [(16, 32, 16), (32, 16, 32), (16, 16, 64)])
def test_triton_nf4_any_tile_shape(tiles, use_backend, monkeypatch):
    """The tuner may pick any (BLOCK_M, BLOCK_N, BLOCK_K) of the table: forward (with the LoRA epilogue) and
    dx agree with the reference for each (interpreter, tile shape set by hand)."""
    import importlib

    nf4mm = importlib.import_module("fastnlg.kernels.nf4_matmul")
    use_backend("triton")
    monkeypatch.setattr(nf4mm, "INTERPRET_CONFIG", (*tiles, 4, 1))
    W, A, B, b = _params(72, 40, 4, torch.float32)
    w = quantize_nf4(W, 64, True)
    x = torch.randn(19, 72)
    dy = torch.randn(19, 40)
    ours = _grads(lambda x_, a, bb, c: lora_linear(x_, w, a, bb, scaling=1.5, bias=c), x, A, B, b, dy)
    ref = _grads(lambda x_, a, bb, c: lora_linear_reference(x_, w, a, bb, scaling=1.5, bias=c), x, A, B, b, dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
