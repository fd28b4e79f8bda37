"""Distillation without either model's logits: a divergence between the student's and the teacher's next-token
distributions, p_s = softmax(h_s W_s^T / T) and p_t = softmax(h_t W_t^T / T), computed chunk by chunk of token rows.

Definitions (TRL's GKD generalized_jsd_loss, with the same names), per token row:
    forward_kl  KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)            (jsd with beta = 0)
    reverse_kl  KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)            (jsd with beta = 1)
    jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = (1 - beta) p_s + beta p_t
Reductions: mean = the sum over the vocabulary and the non-ignored tokens / their number (labels None: every row;
TRL's batchmean divides by the batch size there, this by the tokens), sum, none (per row, 0 where ignored), and
num_items_in_batch (sum / it: gradient accumulation that equals one large batch).

Gradient to the student's logits z_s = x_s / T (derived in tests/ops/test_fused_linear_distillation_loss.py by
fp64 gradcheck), with ls = log p_s, lt = log p_t, lm = log m:
    forward_kl  p_s - p_t
    reverse_kl  p_s (a - sum_v p_s a),  a = ls - lt
    jsd         p_s (g - sum_v p_s g),  g = (1 - beta)(ls - lm)
and dx_s = dz_s / T; gradients reach the student's hidden and weight only (the teacher is a constant). For the
scalar reductions they are computed in the forward pass (three student matmuls and one teacher matmul per chunk,
as eager's), for reduction="none" in backward by recomputing each chunk with the per-row output gradients.
The row math runs in fp32 (fp64 for fp64) on each (chunk, V) pair of logits in plain torch.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_same_device, check_tensor
from .._native import cast, native_dtype
from . import _amp
from .fused_linear_cross_entropy import auto_chunk_size, check_linear_inputs, chunk_grads, drop_ignored, grad_buffers
from .token_loss import check_options, scatter_rows, valid_rows

OP = "fused_linear_distillation_loss"
LOSSES = ("forward_kl", "reverse_kl", "jsd")


def _xlogy_diff(p, a):
    """p * a with 0 where p == 0 (a -inf log-probability there: no 0 * inf)."""
    return torch.where(p > 0, p * a, torch.zeros_like(p))


def divergence_rows(zs, zt, loss, beta, want_grad):
    """(per-row divergence (n,), its gradient w.r.t. zs (n, V) or None) of the temperature-scaled logits."""
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = ls.exp(), lt.exp()
    if loss == "jsd" and beta == 0.0:
        loss = "forward_kl"
    elif loss == "jsd" and beta == 1.0:
        loss = "reverse_kl"
    if loss == "forward_kl":
        rows = _xlogy_diff(pt, lt - ls).sum(-1)
        grad = ps - pt if want_grad else None
    elif loss == "reverse_kl":
        a = ls - lt
        rows = _xlogy_diff(ps, a).sum(-1)
        grad = _xlogy_diff(ps, a - rows[:, None]) if want_grad else None
    else:
        lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        rows = beta * _xlogy_diff(pt, lt - lm).sum(-1) + (1 - beta) * _xlogy_diff(ps, ls - lm).sum(-1)
        if want_grad:
            g = (1 - beta) * (ls - lm)
            grad = _xlogy_diff(ps, g - _xlogy_diff(ps, g).sum(-1, keepdim=True))
        else:
            grad = None
    return rows, grad


def fused_linear_distillation_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                             labels=None, *, loss="forward_kl", beta=0.5, temperature=1.0,
                                             ignore_index=-100, reduction="mean", num_items_in_batch=None):
    """The spec on materialised logits (the matmuls in the inputs' dtype, the rest in fp32 / fp64)."""
    acc = native_dtype(student_hidden)
    zs = torch.nn.functional.linear(student_hidden, student_weight).to(acc) / temperature
    zt = torch.nn.functional.linear(teacher_hidden, teacher_weight).to(acc).detach() / temperature
    rows, _ = divergence_rows(zs, zt, loss, beta, False)
    valid = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if num_items_in_batch is not None:
        return rows.sum() / num_items_in_batch
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def _pass(hs, ws, ht, wt, valid, inv_t, loss, beta, chunk, scale, need_dh, need_dw):
    """Per-row divergences of the rows (hs, ht), and, with `scale` (n,) (the rows' output gradients), the
    student's gradients (dh, dW)."""
    n = hs.shape[0]
    acc = native_dtype(hs)
    rows = torch.empty(n, dtype=acc, device=hs.device)
    grads = scale is not None
    dh, dw, _ = grad_buffers(hs, ws, grads and need_dh, grads and need_dw, False)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xs = torch.nn.functional.linear(hs[s:e], ws)  # (chunk, V)
        with torch.no_grad():
            zt = torch.nn.functional.linear(ht[s:e], wt).to(acc) * inv_t
        r, g = divergence_rows(xs.to(acc) * inv_t, zt, loss, beta, grads)
        ok = None if valid is None else valid[s:e]
        rows[s:e] = r if ok is None else torch.where(ok, r, torch.zeros_like(r))
        if grads:
            w = scale[s:e] * inv_t if ok is None else torch.where(ok, scale[s:e] * inv_t, torch.zeros_like(r))
            xs.copy_(g * w[:, None])
            chunk_grads(xs, hs[s:e], ws, None if dh is None else dh[s:e], dw, None, s == 0)
    return rows, dh, dw


class _FusedLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, labels, loss, beta, inv_t, ignore_index, reduction, num_items, chunk_size,
                grad_mode):
        N, V = hs.shape[0], ws.shape[0]
        valid, n_valid = None, N
        if labels is not None:  # (under torch.compile valid_rows drops nothing: valid None, n_valid a tensor)
            valid, n_valid, _, _ = valid_rows(OP, labels, V, ignore_index, None)
        idx, (h_s, h_t) = drop_ignored(valid, n_valid, N, V * (hs.shape[1] + ht.shape[1]), hs, ht)
        h_s = h_s if h_s.stride(-1) == 1 else h_s.contiguous()
        keep = labels != ignore_index if idx is None and labels is not None else None  # (ignored rows still there)
        chunk = chunk_size or auto_chunk_size(h_s.shape[0], 2 * V, h_s.device)
        need = tuple(grad_mode and n for n in (ctx.needs_input_grad[0], ctx.needs_input_grad[1]))
        scalar = reduction != "none" or num_items is not None
        if num_items is not None:
            den = num_items
        elif reduction == "mean":
            den = n_valid.clamp(min=1).to(native_dtype(hs)) if torch.is_tensor(n_valid) else float(max(n_valid, 1))
        else:
            den = 1.0
        ctx.precomputed = any(need) and scalar
        if ctx.precomputed:
            scale = torch.ones(h_s.shape[0], dtype=native_dtype(hs), device=hs.device) / den
            rows, dh, dw = _pass(h_s, ws, h_t, wt, keep, inv_t, loss, beta, chunk, scale, *need)
            ctx.save_for_backward(idx, dh, dw)
        else:
            rows, _, _ = _pass(h_s, ws, h_t, wt, keep, inv_t, loss, beta, chunk, None, False, False)
            ctx.save_for_backward(idx, hs, ws, ht, wt, keep)
        ctx.N, ctx.chunk, ctx.need, ctx.args = N, chunk, need, (inv_t, loss, beta)
        ctx.dtypes = (hs.dtype, ws.dtype)
        return rows.sum() / den if scalar else scatter_rows(rows, idx, N)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precomputed:
            idx, dh, dw = ctx.saved_tensors
            if dh is not None:
                dh = dh * grad_out.to(dh.dtype)
            if dw is not None:
                dw = dw * grad_out.to(dw.dtype)
        else:
            idx, hs, ws, ht, wt, keep = ctx.saved_tensors
            rows_of = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
            h_s = rows_of(hs)
            scale = rows_of(grad_out).to(native_dtype(hs)).contiguous()
            inv_t, loss, beta = ctx.args
            _, dh, dw = _pass(h_s if h_s.stride(-1) == 1 else h_s.contiguous(), ws, rows_of(ht), wt, keep, inv_t,
                              loss, beta, ctx.chunk, scale, *ctx.need)
        if dh is not None:
            dh = cast(scatter_rows(dh, idx, ctx.N), ctx.dtypes[0])
        if dw is not None:
            dw = cast(dw, ctx.dtypes[1])
        return (dh, dw) + (None,) * 11


def fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                   loss="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                                   num_items_in_batch=None, chunk_size=None):
    """Divergence between the student's and the teacher's token distributions from their hidden states (N, C_s),
    (N, C_t) and LM heads (V, C_s), (V, C_t), without the logits of either; labels (N,) mark the rows to score
    (ignore_index: not scored; None: all). Gradients to the student only. See the module docstring."""
    hs, ws, ht, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    check_tensor(OP, "student_hidden", hs, ndim=2)
    check_tensor(OP, "teacher_hidden", ht, ndim=2)
    amp = _amp.autocast_dtype(hs.device.type)
    if amp is not None:  # the matmuls as F.linear under autocast; the divergence in fp32
        with _amp.autocast_off(hs.device.type):
            return fused_linear_distillation_loss(
                hs.to(amp), _amp.cast(ws, amp), ht.to(amp), _amp.cast(wt, amp), labels, loss=loss, beta=beta,
                temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    y = labels if labels is not None else torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
    check_linear_inputs(OP, hs, ws, y, None, ("student_hidden", "student_weight", "labels", "bias"))
    check_linear_inputs(OP, ht, wt, y, None, ("teacher_hidden", "teacher_weight", "labels", "bias"))
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"{OP}: the student's vocabulary (student_weight {tuple(ws.shape)}: V = {ws.shape[0]}) and "
                         f"the teacher's (teacher_weight {tuple(wt.shape)}: V = {wt.shape[0]}) must match")
    check_same_device(OP, student_hidden=hs, teacher_hidden=ht)
    if loss not in LOSSES:
        raise ValueError(f"{OP}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{OP}: beta must be in [0, 1], got {beta}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"{OP}: temperature must be a number > 0, got {temperature!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be >= 1, got {chunk_size}")
    num_items = check_options(OP, reduction, 0.0, None, 0.0, num_items_in_batch)
    out = _FusedLinearDistillation.apply(hs, ws, ht.detach(), wt.detach(), None if labels is None else labels.long(),
                                         loss, float(beta), 1.0 / float(temperature), int(ignore_index), reduction,
                                         num_items, chunk_size, torch.is_grad_enabled())
    return out
