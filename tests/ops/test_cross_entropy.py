import importlib

import pytest
import torch
import torch.nn.functional as F

from fastnlg.ops import cross_entropy, fused_linear_cross_entropy
from fastnlg.ops.cross_entropy import cross_entropy_reference
from tests.conftest import backend_params, skip_interpreter_bf16
from tests.tolerance import assert_by_rule

BACKENDS = backend_params()
OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"softcap": 3.0},
    {"z_loss": 1e-2},
    {"num_items_in_batch": 7},
    {"label_smoothing": 0.2, "softcap": 5.0, "z_loss": 1e-3, "reduction": "sum"},
]


def _data(N, V, C, device, ignore_frac=0.3):
    h = torch.randn(N, C, device=device)
    w = torch.randn(V, C, device=device) / C ** 0.5 * 3
    b = torch.randn(V, device=device)
    y = torch.randint(0, V, (N,), device=device)
    y[torch.rand(N, device=device) < ignore_frac] = -100
    return h, w, b, y


def _flce_grads(fn, h, w, b, y, dtype, kw, out_grad):
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h, w, b))
    loss = fn(h, w, b, y, kw)
    if loss.dim():
        (loss * out_grad.to(loss.dtype)).sum().backward()
    else:
        loss.backward()
    return loss, h.grad, w.grad, b.grad


def _ours(h, w, b, y, kw, chunk=None):
    kw = {("ce_weight" if k == "weight" else k): v for k, v in kw.items()}  # class weights: Liger's name
    return fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, **kw)


def _ref(h, w, b, y, kw):
    if "weight" in kw:
        kw = {**kw, "weight": kw["weight"].to(h.dtype)}
    return cross_entropy_reference(F.linear(h, w, b), y, **kw)


def _check_flce(device, dtype, N, V, C, kw, chunk=None, ignore_frac=0.3):
    h, w, b, y = _data(N, V, C, device, ignore_frac)
    out_grad = torch.rand(N, device=device) if kw.get("reduction") == "none" and "num_items_in_batch" not in kw else torch.ones(())
    run = (lambda fn: _flce_grads(fn, h, w, b, y, dtype, kw, out_grad.to(device)))
    ours = run(lambda *a: _ours(*a, chunk=chunk))
    ref = _flce_grads(_ref, h, w, b, y, torch.float64, kw, out_grad.to(device).double())
    low = run(_ref)
    for name, o, r, l in zip(("loss", "dh", "dw", "db"), ours, ref, low):
        assert_by_rule(name, o, l, r, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_flce_options(device, backend, kw, use_backend):
    use_backend(backend)
    _check_flce(device, torch.float32, 37, 101, 24, kw, chunk=8)


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_flce_cpp_each_isa_build(kw, cpu_isa, use_backend):
    use_backend("cpp")
    _check_flce("cpu", torch.float32, 37, 1001, 24, kw, chunk=8)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("N,V,C,chunk", [(1, 1, 8, None), (1, 50, 3, None), (64, 5000, 16, 16), (9, 333, 7, 4)])
def test_flce_odd_sizes(device, backend, N, V, C, chunk, use_backend):
    use_backend(backend)
    _check_flce(device, torch.float32, N, V, C, {}, chunk=chunk)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flce_low_precision(device, backend, dtype, use_backend):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 under the Triton interpreter is not GPU arithmetic; covered by the gpu tier")
    use_backend(backend)
    _check_flce(device, dtype, 32, 257, 64, {"label_smoothing": 0.1}, chunk=8)


@pytest.mark.parametrize("fast", [True, False], ids=["matmul-in-dtype", "matmul-in-fp32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8, None], ids=["chunks", "one-chunk"])
def test_flce_low_precision_weight_gradient_on_cpu(fast, dtype, chunk, monkeypatch, use_backend):
    """On CPU, dW of an fp16/bf16 weight is a matmul in that dtype where oneDNN has native kernels for it (as
    eager's under autocast), else one in fp32: both paths, whichever this CPU takes, by the tolerance rule."""
    import importlib

    module = importlib.import_module("fastnlg.ops.fused_linear_cross_entropy")
    monkeypatch.setattr(module, "_fast_matmul", lambda dtype, device: fast)
    use_backend("cpp")
    _check_flce("cpu", dtype, 32, 257, 64, {"label_smoothing": 0.1}, chunk=chunk)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_flce_all_ignored_and_frozen_weight(device, backend, use_backend):
    use_backend(backend)
    h, w, b, _ = _data(6, 20, 8, device)
    y = torch.full((6,), -100, device=device)
    h.requires_grad_()
    w.requires_grad_()
    for red in ("mean", "sum", "none"):
        loss = fused_linear_cross_entropy(h, w, y, reduction=red)
        assert torch.equal(loss, torch.zeros_like(loss))
        loss.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    w2 = w.detach()  # frozen lm_head (LoRA): only dh
    h.grad = None
    y = torch.randint(0, 20, (6,), device=device)
    fused_linear_cross_entropy(h, w2, y).backward()
    ref_h = h.detach().double().requires_grad_()
    cross_entropy_reference(ref_h @ w2.double().t(), y).backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-6)


def test_flce_non_contiguous_hidden():
    h, w, b, y = _data(10, 30, 16, "cpu")
    h_nc = torch.randn(16, 10).t()
    h_nc.requires_grad_()
    loss = fused_linear_cross_entropy(h_nc, w, y, chunk_size=3)
    loss.backward()
    h_ref = h_nc.detach().double().requires_grad_()
    ref = cross_entropy_reference(h_ref @ w.double().t(), y)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_nc.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_full_batch():
    """k micro-batches with num_items_in_batch give exactly the full batch's mean-loss gradient."""
    h, w, b, y = _data(48, 40, 12, "cpu", ignore_frac=0.5)
    y[:16] = -100  # an uneven split of real tokens over the micro-batches
    n_items = int((y != -100).sum())
    w_full = w.clone().requires_grad_()
    fused_linear_cross_entropy(h, w_full, y).backward()
    w_acc = w.clone().requires_grad_()
    for part in torch.arange(48).chunk(3):
        fused_linear_cross_entropy(h[part], w_acc, y[part], num_items_in_batch=n_items).backward()
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-5, atol=1e-7)


def test_reference_matches_torch():
    logits, y = torch.randn(20, 11, dtype=torch.float64), torch.randint(0, 11, (20,))
    y[::3] = -100
    w = torch.rand(11, dtype=torch.float64) + 0.5
    for red in ("mean", "sum", "none"):
        for kw in ({"label_smoothing": 0.15}, {"weight": w}, {"weight": w, "label_smoothing": 0.15}):
            torch.testing.assert_close(cross_entropy_reference(logits, y, reduction=red, **kw),
                                       F.cross_entropy(logits, y, reduction=red, **kw))


WEIGHTED = [
    {},
    {"label_smoothing": 0.2},
    {"label_smoothing": 0.2, "reduction": "sum"},
    {"label_smoothing": 0.1, "reduction": "none", "z_loss": 1e-2},
    {"z_loss": 1e-2, "softcap": 4.0},
    {"label_smoothing": 0.1, "num_items_in_batch": 9},
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kw", WEIGHTED, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_class_weights(device, backend, kw, use_backend):
    """weight= as F.cross_entropy's (the fused loss: ce_weight=, Liger's name), with ignore_index, label
    smoothing, z-loss and every reduction, on each backend, against the fp64 spec (which equals torch's)."""
    use_backend(backend)
    cw = torch.rand(101, device=device) * 2
    cw[3] = 0.0  # a class that does not count
    _check_flce(device, torch.float32, 37, 101, 24, {**kw, "weight": cw}, chunk=8)
    _check_on_logits(device, 101, {**kw, "weight": cw}, scale=3.0)


def test_class_weights_gradcheck_fp64():
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    cw = torch.rand(9, dtype=torch.float64) + 0.1
    y = torch.tensor([1, -100, 8, 0, 3, 3])
    kw = {"label_smoothing": 0.2, "z_loss": 0.1, "softcap": 2.0}
    assert torch.autograd.gradcheck(lambda a, c: fused_linear_cross_entropy(a, c, y, ce_weight=cw, chunk_size=4, **kw),
                                    (h, w))
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, y, weight=cw, **kw), (logits,))


@pytest.mark.parametrize("kw", [{"softcap": 2.0, "z_loss": 0.1, "label_smoothing": 0.2}, {"reduction": "none"}])
def test_gradcheck_fp64(kw):
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 8, 0, 3, 3])
    assert torch.autograd.gradcheck(lambda a, c, d: fused_linear_cross_entropy(a, c, y, bias=d, chunk_size=4, **kw), (h, w, b))
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, y, **kw), (logits,))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kw", OPTIONS[:7], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_cross_entropy_on_logits(device, backend, kw, use_backend):
    use_backend(backend)
    _check_on_logits(device, 300, kw)


def _check_on_logits(device, V, kw, scale=4.0):
    """cross_entropy on (13, V) logits (every 4th row ignored) against the fp64 spec, by the tolerance rule;
    tensor options (class weights) follow each run's dtype."""
    logits = torch.randn(13, V, device=device) * scale
    y = torch.randint(0, V, (13,), device=device)
    y[::4] = -100
    g = torch.rand(13, device=device) if kw.get("reduction") == "none" else torch.ones((), device=device)

    def run(fn, dt):
        x = logits.detach().to(dt).clone().requires_grad_()
        loss = fn(x, y, **{k: (v.to(dt) if torch.is_tensor(v) else v) for k, v in kw.items()})
        loss.backward(g.to(loss.dtype) if loss.dim() else None)
        return loss, x.grad

    ours, ref, low = run(cross_entropy, torch.float32), run(cross_entropy_reference, torch.float64), \
        run(cross_entropy_reference, torch.float32)
    assert_by_rule("loss", ours[0], low[0], ref[0], torch.float32)
    assert_by_rule("dlogits", ours[1], low[1], ref[1], torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_vocab_and_nan(device, backend, eps, use_backend):
    """-inf logits (masked / padded vocab entries, here a whole first Triton tile) give F.cross_entropy's
    finite loss and zero gradient there; a NaN logit makes its row NaN instead of being skipped."""
    use_backend(backend)
    V = 5000
    logits = torch.randn(3, V, device=device)
    logits[:, :4096] = -float("inf")
    logits[2, 10:20] = -float("inf")
    y = torch.tensor([4100, 4999, 4500], device=device)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, y, label_smoothing=eps)
    loss.backward()
    ref = F.cross_entropy(logits.double(), y, label_smoothing=eps)
    if eps:
        assert torch.isinf(loss) and torch.isinf(ref)
    else:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.all(x.grad[:, :4096] == 0)
    bad = logits.clone()
    bad[1, 4500] = float("nan")
    rows = cross_entropy(bad, y, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[0]) and torch.isfinite(rows[2])


def test_peak_memory_grows_with_chunk_not_logits(use_backend):
    """CPU: fwd+bwd peak of the fused loss is bounded by the chunk, far below eager's N x V logits."""
    from benchmarks.harness import peak_memory_mb

    use_backend("cpp")  # the CPU default; the interpreter would only make this slow

    N, V, C = 2048, 16000, 64
    h = torch.randn(N, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    y = torch.randint(0, V, (N,))

    def eager():
        F.cross_entropy(F.linear(h, w).float(), y).backward()

    def fused(chunk):
        return lambda: fused_linear_cross_entropy(h, w, y, chunk_size=chunk).backward()

    eager_mb = peak_memory_mb(eager, "cpu")
    small, large = peak_memory_mb(fused(64), "cpu"), peak_memory_mb(fused(512), "cpu")
    logits_mb = N * V * 4 / 2**20  # 125 MB
    assert eager_mb > 1.5 * logits_mb
    assert small < eager_mb / 5, (small, eager_mb)
    assert small < large, (small, large)  # the working set follows the chunk


def test_bad_input():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 10, -100])
    with pytest.raises(ValueError, match=r"1 label\(s\) outside \[0, 10\).*row 2: 10"):
        fused_linear_cross_entropy(h, w, y)
    with pytest.raises(ValueError, match=r"hidden \(N, C\) = \(4, 8\) and weight \(V, C\) = \(10, 7\)"):
        fused_linear_cross_entropy(h, torch.randn(10, 7), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"labels \(3,\) must have one entry per row"):
        fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="dtypes must match"):
        fused_linear_cross_entropy(h, w.half(), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), reduction="avg")
    with pytest.raises(TypeError, match="labels has dtype torch.float32"):
        cross_entropy(torch.randn(4, 10), torch.ones(4))


def test_cross_entropy_inplace_backward():
    """inplace_backward=True gives the same loss and gradient, reuses the logits' memory, and a second use
    of the overwritten logits in backward raises instead of reading gradients."""
    base = torch.randn(6, 50, requires_grad=True)
    y = torch.randint(0, 50, (6,))
    x = base * 2
    loss = cross_entropy(x, y, inplace_backward=True)
    ptr = x.data_ptr()
    loss.backward()
    ref = base.detach().clone().requires_grad_()
    cross_entropy_reference(ref * 2, y).backward()
    torch.testing.assert_close(base.grad, ref.grad)
    assert x.data_ptr() == ptr
    x2 = base * 2
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ((x2 * x2).sum() + cross_entropy(x2, y, inplace_backward=True)).backward()


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "fused_linear_cross_entropy"])
def test_no_gradient_work_under_no_grad(fused, monkeypatch):
    """Under torch.no_grad the losses compute no gradient, though the inputs require grad (an evaluation
    step on a model in training mode): the fused loss runs one matmul per chunk, not three, and the logits
    loss writes no gradient. The loss is the one computed with gradients."""
    ce_mod = importlib.import_module("fastnlg.ops.cross_entropy")
    flce_mod = importlib.import_module("fastnlg.ops.fused_linear_cross_entropy")

    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (12,))
    scales = []
    real = ce_mod.ce_chunk
    spy = (lambda logits, labels, scale, o: scales.append(scale) or real(logits, labels, scale, o))
    monkeypatch.setattr(flce_mod if fused else ce_mod, "ce_chunk", spy)
    logits = (h @ w.t()).detach().requires_grad_()
    loss_fn = (lambda: fused_linear_cross_entropy(h, w, y, chunk_size=5)) if fused else \
        (lambda: cross_entropy(logits, y))
    with torch.no_grad():
        loss = loss_fn()
    assert loss.grad_fn is None and scales and all(s is None for s in scales)
    scales.clear()
    with_grad = loss_fn()
    assert with_grad.grad_fn is not None and all(s is not None for s in scales)
    torch.testing.assert_close(loss, with_grad.detach())


@pytest.mark.parametrize("ignored,dropped", [(8, False), (600, True)])
def test_ignored_rows_are_dropped_where_that_pays(ignored, dropped, monkeypatch, use_backend):
    """Ignored rows get no matmul work when dropping them saves COMPACT_MIN_MACS (600 x 500 x 64 here), and
    are kept, with zero loss and gradient from the kernels, when the gather and scatter would cost more
    (8 x 500 x 64): the loss, the gradients and the z-loss extra are the same either way."""
    use_backend("cpp")  # (the rule is the same on every backend)
    flce_mod = importlib.import_module("fastnlg.ops.fused_linear_cross_entropy")
    rows = []
    real = flce_mod._linear_ce_pass
    monkeypatch.setattr(flce_mod, "_linear_ce_pass", lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k))
    N, V, C = 1000, 500, 64
    h = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) / 8).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[torch.randperm(N)[:ignored]] = -100
    out = fused_linear_cross_entropy(h, w, y, z_loss=1e-3, return_z_loss=True)
    assert rows == [N - ignored if dropped else N]
    out.loss.backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = ref_h @ ref_w.t()
    keep = y != -100
    lse = torch.logsumexp(logits[keep], -1)
    ref = F.cross_entropy(logits, y) + 1e-3 * (lse * lse).mean()
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.z_loss, 1e-3 * (lse * lse).mean().detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("ignored", [0, 3])
def test_repeated_backward_of_a_retained_graph(ignored):
    """The fused loss's gradients are computed in forward and handed out in backward: three backward passes
    over a retained graph accumulate three times the gradient (no pass hands out a tensor another one
    accumulated into)."""
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (10,))
    y[:ignored] = -100
    loss = fused_linear_cross_entropy(h, w, y)
    for _ in range(3):
        loss.backward(retain_graph=True)
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3 * F.cross_entropy(ref_h @ ref_w.t(), y)).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)


def test_fused_loss_backward_reads_nothing_back_from_the_device(monkeypatch):
    """The backward of the fused loss makes no host read from a device (on a GPU each would be a sync in
    every step): on CPU it reads grad_out alone, to skip scaling by 1; a tensor on any other device (meta
    here) is never read."""
    from fastnlg.ops import fused_linear_cross_entropy
    from fastnlg.ops.fused_linear_cross_entropy import _one_on_cpu

    assert not _one_on_cpu(torch.ones((), device="meta"))  # (reading a meta tensor would raise)

    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (12,))
    loss = fused_linear_cross_entropy(h, w, y, num_items_in_batch=10)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: reads.append(_n) or _r(self, *a))
    (2 * loss).backward()
    monkeypatch.undo()
    assert reads == ["item"]
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (2 * torch.nn.functional.cross_entropy(ref_h @ ref_w.t(), y, reduction="sum") / 10).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loss_dtype_is_torchs(device, backend, dtype, use_backend):
    """The returned loss has the dtype F.cross_entropy (and F.linear + F.cross_entropy) returns: the input's,
    and fp32 under autocast; loss_dtype overrides it. assert_close against torch does not fail on dtype."""
    skip_interpreter_bf16(device, backend, dtype)
    use_backend(backend)
    logits, y = torch.randn(8, 30, device=device).to(dtype), torch.randint(0, 30, (8,), device=device)
    h, w = torch.randn(8, 16, device=device).to(dtype), torch.randn(30, 16, device=device).to(dtype)
    for red in ("mean", "none"):
        torch.testing.assert_close(cross_entropy(logits, y, reduction=red),
                                   F.cross_entropy(logits, y, reduction=red), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, y, reduction=red),
                                   F.cross_entropy(F.linear(h, w), y, reduction=red), atol=5e-2, rtol=2e-2)
    assert cross_entropy(logits, y, loss_dtype=torch.float32).dtype == torch.float32
    assert fused_linear_cross_entropy(h, w, y, loss_dtype=torch.float32).dtype == torch.float32
    with torch.autocast(device, torch.bfloat16):
        assert F.cross_entropy(logits, y).dtype == cross_entropy(logits, y).dtype == torch.float32
        assert F.cross_entropy(F.linear(h.float(), w.float()), y).dtype == torch.float32
        assert fused_linear_cross_entropy(h.float(), w.float(), y).dtype == torch.float32


def test_softcap_zero_or_none_is_off():
    logits, y = torch.randn(8, 30), torch.randint(0, 30, (8,))
    h, w = torch.randn(8, 16), torch.randn(30, 16)
    off = cross_entropy(logits, y)
    assert torch.equal(cross_entropy(logits, y, softcap=0.0), off)
    assert torch.equal(cross_entropy(logits, y, softcap=None), off)
    assert torch.equal(fused_linear_cross_entropy(h, w, y, softcap=0), fused_linear_cross_entropy(h, w, y))
    with pytest.raises(ValueError, match="softcap must be > 0, or 0 / None for off, got -1"):
        cross_entropy(logits, y, softcap=-1.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"reduction": "none"}, {"num_items_in_batch": 11},
                                {"reduction": "none", "num_items_in_batch": 11},
                                {"weight": True, "label_smoothing": 0.1}, {"softcap": 3.0}],
                         ids=["mean", "sum", "none", "num_items", "none+num_items", "weighted", "softcap"])
def test_z_loss_and_token_accuracy_returned(device, backend, kw, use_backend):
    """return_z_loss: the z-loss part of the total (loss with z_loss minus loss without, and the spec's);
    return_token_accuracy: argmax == label over non-ignored tokens of the materialised logits (chunk by chunk
    in the fused loss). Both detached; the loss and its gradients are the same as without them."""
    use_backend(backend)
    N, V, C = 29, 57, 12
    h, w = torch.randn(N, C, device=device), torch.randn(V, C, device=device)
    y = torch.randint(0, V, (N,), device=device)
    y[::5] = -100
    logits = F.linear(h, w)
    y[1] = int(logits[1].argmax())  # at least one hit
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(V, device=device) + 0.5
    zl = 0.05
    scalar = kw.get("reduction", "mean") != "none" or "num_items_in_batch" in kw
    spec = cross_entropy_reference(logits.double(), y, z_loss=zl, return_z_loss=True, return_token_accuracy=True,
                                   **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    hits = (logits.argmax(-1) == y) & (y != -100)
    expect_acc = hits.sum() / (y != -100).sum() if scalar else hits.float()
    for name, fn in (("cross_entropy", lambda **o: cross_entropy(logits, y, **kw, **o)),
                     ("fused", lambda **o: _ours(h, w, None, y, {**kw, **o}, chunk=7))):
        out = fn(z_loss=zl, return_z_loss=True, return_token_accuracy=True)
        plain = fn(z_loss=zl)
        without = fn(z_loss=0.0)
        assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad
        torch.testing.assert_close(out.loss, plain, msg=name)
        torch.testing.assert_close(out.z_loss, out.loss - without, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(out.z_loss.double(), spec.z_loss, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(out.token_accuracy.float(), expect_acc.float(), msg=name)
        torch.testing.assert_close(spec.token_accuracy.float(), expect_acc.float(), msg=name)
        only_acc = fn(return_token_accuracy=True)
        assert only_acc.z_loss is None and only_acc.token_accuracy is not None


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_accuracy_at_a_real_vocabulary(device, backend, softcap, use_backend):
    """fp32 losses of 32k-wide rows are as accurate as torch's fp32 (against fp64), with softcap too (the
    C++ softcap sweeps are scalar: they sum in double, where a sequential fp32 sum was 5x torch's error)."""
    use_backend(backend)
    x = torch.randn(48, 32000, device=device) * 8
    y = torch.randint(0, 32000, (48,), device=device)
    ref = cross_entropy_reference(x.double(), y, softcap=softcap, reduction="none")
    ours = cross_entropy(x, y, softcap=softcap, reduction="none")
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    plain = F.cross_entropy(z, y, reduction="none")
    err_ours, err_torch = (ours.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert err_ours <= 2 * err_torch + 2e-6, (err_ours.item(), err_torch.item())  # losses ~30: atol ~ 1e-7 rel


@pytest.mark.parametrize("op", ["fused", "logits"])
def test_tensor_num_items_is_never_read_back(op, monkeypatch):
    """HF Trainer passes num_items_in_batch as a tensor: the losses divide by it where it lives (on a GPU,
    reading it would be a sync per micro-batch) and give what the number gives. The one host read left in
    a forward is the label check (the count and range of the labels, one tolist)."""
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (12,))
    y[:3] = -100

    def run(n):
        if op == "fused":
            return fused_linear_cross_entropy(h, w, y, num_items_in_batch=n, z_loss=1e-3, return_z_loss=True)
        return cross_entropy(h @ w.t(), y, num_items_in_batch=n, z_loss=1e-3, return_z_loss=True)

    want = run(7)
    g_want = torch.autograd.grad(want.loss, (h, w))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: reads.append(_n) or _r(self, *a))
    got = run(torch.tensor(7))
    g_got = torch.autograd.grad(got.loss, (h, w))
    monkeypatch.undo()
    assert reads == (["tolist", "item"] if op == "fused" else ["tolist"])  # (item: grad_out, on CPU only)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.z_loss, want.z_loss)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "fused_linear_cross_entropy"])
def test_losses_under_torch_compile_fullgraph(fused):
    """Both losses compile with fullgraph=True (no host read of the labels: the range check is a device
    assert, no row compaction) and give the eager values, gradients and extras, with ignored rows, class
    weights, smoothing and a z-loss; a bad label still raises."""
    from fastnlg.ops import cross_entropy, fused_linear_cross_entropy

    torch.manual_seed(0)
    N, C, V = 19, 8, 13
    h = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[[2, 7, 11]] = -100
    cw = torch.rand(V, dtype=torch.float64) + 0.5
    kw = dict(label_smoothing=0.1, z_loss=1e-3, return_z_loss=True, return_token_accuracy=True)

    def f(h, w, y):
        if fused:
            return fused_linear_cross_entropy(h, w, y, ce_weight=cw, chunk_size=8, **kw)
        return cross_entropy(h @ w.t(), y, weight=cw, **kw)

    def run(fn):
        h.grad = w.grad = None
        out = fn(h, w, y)
        out.loss.backward()
        return out, h.grad.clone(), w.grad.clone()
    ref, gh, gw = run(f)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out, ch, cwg = run(compiled)
        bad = y.clone()
        bad[0] = V
        with pytest.raises(RuntimeError, match="outside"):
            compiled(h, w, bad)
    finally:
        torch._dynamo.reset()
    for got, want in ((out.loss, ref.loss), (out.z_loss, ref.z_loss), (out.token_accuracy, ref.token_accuracy),
                      (ch, gh), (cwg, gw)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
