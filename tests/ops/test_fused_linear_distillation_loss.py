"""fused_linear_distillation_loss: forward / reverse KL and generalised JSD between a student and a teacher from
their hidden states and heads, without either's logits: against TRL's GKD generalized_jsd_loss on materialised
fp64 logits, the tolerance rule in fp32 / fp16 / bf16, fp64 gradcheck of the backward, reductions, gradient
accumulation, ignored rows, autocast, torch.compile, peak memory and bad input."""
import pytest
import torch
import torch.nn.functional as F

from fastnlg.ops import fused_linear_distillation_loss as fldl
from fastnlg.ops.fused_linear_distillation_loss import fused_linear_distillation_loss_reference as reference
from tests.tolerance import assert_by_rule

LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def _data(N, V, Cs, Ct, ignore_frac=0.3, dtype=torch.float32):
    hs, ws = torch.randn(N, Cs, dtype=dtype), torch.randn(V, Cs, dtype=dtype) / Cs ** 0.5 * 2
    ht, wt = torch.randn(N, Ct, dtype=dtype), torch.randn(V, Ct, dtype=dtype) / Ct ** 0.5 * 2
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < ignore_frac] = -100
    return hs, ws, ht, wt, y


def _grads(fn, hs, ws, ht, wt, y, dtype, **kw):
    hs, ws = (t.detach().to(dtype).requires_grad_() for t in (hs, ws))
    out = fn(hs, ws, ht.to(dtype), wt.to(dtype), y, **kw)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return out, hs.grad, ws.grad


@pytest.mark.parametrize("loss,beta", LOSSES)
def test_equals_trl_generalized_jsd(loss, beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(loss, beta)
    hs, ws, ht, wt, y = (t.double() if t.is_floating_point() else t for t in _data(30, 41, 8, 12))
    B, T = 5, 6
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    theirs = gkd.GKDTrainer.generalized_jsd_loss(F.linear(hs1, ws1).view(B, T, -1), F.linear(ht, wt).view(B, T, -1),
                                                 labels=y.view(B, T), beta=trl_beta, temperature=0.7)
    theirs.backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ours = fldl(hs2, ws2, ht, wt, y, loss=loss, beta=beta, temperature=0.7, chunk_size=7)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hs2.grad, hs1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ws2.grad, ws1.grad, rtol=1e-9, atol=1e-12)
    n_items = int((y != -100).sum()) + 3  # TRL's gradient-accumulation normaliser
    theirs = gkd.GKDTrainer.generalized_jsd_loss(F.linear(hs, ws).view(B, T, -1), F.linear(ht, wt).view(B, T, -1),
                                                 labels=y.view(B, T), beta=trl_beta, num_items_in_batch=n_items)
    torch.testing.assert_close(fldl(hs, ws, ht, wt, y, loss=loss, beta=beta, num_items_in_batch=n_items), theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tolerance_rule(dtype, loss, beta, reduction):
    hs, ws, ht, wt, y = _data(37, 300, 16, 24)
    kw = {"loss": loss, "beta": beta, "temperature": 1.3, "reduction": reduction}
    ours = _grads(lambda *a, **k: fldl(*a, chunk_size=8, **k), hs, ws, ht, wt, y, dtype, **kw)
    ref = _grads(reference, hs, ws, ht, wt, y, torch.float64, **kw)
    low = _grads(reference, hs, ws, ht, wt, y, dtype, **kw)
    for name, o, r, lo in zip(("loss", "dh", "dw"), ours, ref, low):
        assert_by_rule(name, o, lo, r, dtype)


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fp64(loss, beta, reduction):
    hs, ws, ht, wt, y = (t.double() if t.is_floating_point() else t for t in _data(6, 9, 4, 5))
    f = (lambda hs, ws: fldl(hs, ws, ht, wt, y, loss=loss, beta=beta, temperature=0.8, reduction=reduction,
                             chunk_size=4))
    assert torch.autograd.gradcheck(f, (hs.requires_grad_(), ws.requires_grad_()))


def test_reductions_ignored_rows_and_accumulation():
    hs, ws, ht, wt, y = _data(20, 50, 8, 8)
    rows = fldl(hs, ws, ht, wt, y, reduction="none")
    assert torch.all(rows[y == -100] == 0) and torch.all(rows[y != -100] > 0)
    torch.testing.assert_close(fldl(hs, ws, ht, wt, y, reduction="sum"), rows.sum())
    torch.testing.assert_close(fldl(hs, ws, ht, wt, y), rows.sum() / (y != -100).sum())
    torch.testing.assert_close(fldl(hs, ws, ht, wt, None), fldl(hs, ws, ht, wt, None, reduction="none").mean())
    all_ignored = torch.full_like(y, -100)
    w = ws.clone().requires_grad_()
    out = fldl(hs, w, ht, wt, all_ignored)
    out.backward()
    assert out.item() == 0 and torch.all(w.grad == 0)
    # micro-batches with the whole batch's count of scored tokens == the whole batch
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    fldl(h1, w1, ht, wt, y, loss="jsd").backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    n = int((y != -100).sum())
    for s in (slice(0, 7), slice(7, 20)):
        fldl(h2[s], w2, ht[s], wt, y[s], loss="jsd", num_items_in_batch=n).backward()
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_teacher_gets_no_gradient_and_autocast():
    hs, ws, ht, wt, y = _data(16, 64, 8, 8)
    wt.requires_grad_()
    w = ws.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fldl(hs, w, ht, wt, y, loss="reverse_kl")
        ref = reference(hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), y, loss="reverse_kl")
    out.backward()
    assert out.dtype == torch.float32 and w.grad.dtype == torch.float32 and wt.grad is None
    assert_by_rule("loss", out, ref, reference(hs.double(), ws.double(), ht.double(), wt.double(), y,
                                               loss="reverse_kl"), torch.bfloat16)


def test_torch_compile_fullgraph():
    hs, ws, ht, wt, y = _data(10, 40, 8, 6)

    def f(h, w):
        return fldl(h, w, ht, wt, y, loss="jsd", beta=0.4)

    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(h1, w1).backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    f(h2, w2).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_peak_memory_is_a_chunk_not_the_logits():
    from benchmarks.harness import peak_memory_mb

    N, V, C = 1024, 16000, 64
    hs, ws, ht, wt, y = _data(N, V, C, C, ignore_frac=0.0)
    hs.requires_grad_()
    ws.requires_grad_()

    def eager():
        reference(hs, ws, ht, wt, y).backward()

    eager_mb = peak_memory_mb(eager, "cpu")
    ours_mb = peak_memory_mb(lambda: fldl(hs, ws, ht, wt, y, chunk_size=64).backward(), "cpu")
    assert eager_mb > 2 * N * V * 4 / 2**20  # (the two models' logits at least)
    assert ours_mb < eager_mb / 5, (ours_mb, eager_mb)


def test_bad_input():
    hs, ws, ht, wt, y = _data(4, 10, 8, 6)
    with pytest.raises(ValueError, match=r"student's vocabulary .*V = 10.*teacher's .*V = 12\) must match"):
        fldl(hs, ws, ht, torch.randn(12, 6), y)
    with pytest.raises(ValueError, match=r"teacher_hidden \(N, C\) = \(4, 6\) and teacher_weight \(V, C\) = \(10, 5\)"):
        fldl(hs, ws, ht, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match=r"labels \(3,\) must have one entry per row of student_hidden"):
        fldl(hs, ws, ht, wt, y[:3])
    with pytest.raises(ValueError, match="loss must be one of forward_kl, reverse_kl, jsd"):
        fldl(hs, ws, ht, wt, y, loss="kl")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        fldl(hs, ws, ht, wt, y, loss="jsd", beta=1.5)
    with pytest.raises(TypeError, match="dtypes must match"):
        fldl(hs, ws.double(), ht, wt, y)
