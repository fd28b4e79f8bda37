"""Cross-entropy on logits (N, V), with F.cross_entropy's arguments and Liger's: the op, and its spec
(cross_entropy_reference). Semantics, per-row math and the chunk kernels: token_loss.py, shared with the fused
linear + cross-entropy (fused_linear_cross_entropy.py).
"""
from __future__ import annotations

import torch

from .._checks import check_same_device, check_tensor
from .._native import native_dtype
from . import _amp
from .token_loss import (
    BACKENDS,  # noqa: F401  (the op's backends: the chunk kernels')
    CrossEntropyOutput,
    Extras,
    Opts,
    ce_chunk,
    check_class_weight,
    check_options,
    denominators,
    finish,
    outputs,
    prepare,
    row_scale,
)


def cross_entropy_reference(logits, labels, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, softcap=None, z_loss=0.0, num_items_in_batch=None,
                            return_z_loss=False, return_token_accuracy=False):
    """The spec, in plain torch (fp32, or fp64 for fp64 logits); returns the loss in the accumulation dtype."""
    acc = native_dtype(logits)
    V = logits.shape[-1]
    z = logits.to(acc)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    w = None if weight is None else weight.to(acc)
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, safe[:, None]).squeeze(-1)
    wy = 1.0 if w is None else w[safe]
    if label_smoothing > 0:  # no 0 * inf (-inf logits)
        zw = z.sum(-1) if w is None else (z * w).sum(-1)
        smooth = label_smoothing / V * ((V if w is None else w.sum()) * lse - zw)
    else:
        smooth = 0.0
    ce = torch.where(valid, (1 - label_smoothing) * wy * nll + smooth, torch.zeros_like(nll))
    zl = torch.where(valid, z_loss * lse * lse, torch.zeros_like(nll))
    n_valid = int(valid.sum())
    w_valid = None if w is None else float(torch.where(valid, wy, 0.0).sum())
    ce_den, z_den = denominators(reduction, num_items_in_batch, n_valid, w_valid)
    rows = reduction == "none" and num_items_in_batch is None
    if rows:
        loss, zpart = ce + zl, zl
    else:
        loss, zpart = ce.sum() / ce_den + zl.sum() / z_den, zl.sum() / z_den
    if not (return_z_loss or return_token_accuracy):
        return loss
    hits = (z.argmax(-1) == labels) & valid
    accuracy = hits.to(acc) if rows else hits.sum().to(acc) / n_valid if n_valid else \
        torch.tensor(float("nan"), dtype=acc)
    return CrossEntropyOutput(loss, zpart if return_z_loss else None, accuracy if return_token_accuracy else None)


def cross_entropy(logits, labels, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  softcap=None, z_loss=0.0, num_items_in_batch=None, inplace_backward=False, return_z_loss=False,
                  return_token_accuracy=False, loss_dtype=None):
    """Cross-entropy on logits (N, V) with F.cross_entropy's arguments (weight (V,) class weights): one online
    log-sum-exp pass per row; the gradient is computed in the forward pass into a fresh (N, V) buffer, or,
    with inplace_backward=True, into the logits' own memory (saves N x V; the logits' values are gone
    afterwards, and autograd's version counter is bumped so any other use of them in backward raises
    instead of reading gradients). See the module docstring for the rest."""
    op = "cross_entropy"
    check_tensor(op, "logits", logits, ndim=2)
    check_tensor(op, "labels", labels, dtypes=(torch.int64, torch.int32), ndim=1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must have one entry per row of logits {tuple(logits.shape)}")
    check_same_device(op, logits=logits, labels=labels)
    check_class_weight(op, weight, logits.shape[1], "weight", labels)
    num_items = check_options(op, reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    if loss_dtype is None:  # F.cross_entropy runs in fp32 under autocast
        loss_dtype = torch.float32 if _amp.autocast_dtype(logits.device.type) else logits.dtype
    want = Extras(bool(return_z_loss), bool(return_token_accuracy))
    opts = Opts(ignore_index, float(label_smoothing), float(softcap) if softcap else None, float(z_loss), weight, 0.0)
    loss, zpart, acc = _CrossEntropy.apply(logits, labels.long(), reduction, opts, num_items, bool(inplace_backward),
                                           want, torch.is_grad_enabled())
    return finish(loss, zpart, acc, loss_dtype, want)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, reduction, opts, num_items, inplace, want, grad_mode):
        N, V = logits.shape
        _, n_valid, ce_den, z_den, o = prepare("cross_entropy", labels, V, opts, reduction, num_items,
                                                native_dtype(logits))
        scalar = reduction != "none" or num_items is not None
        grad = grad_mode and ctx.needs_input_grad[0]  # (requires_grad, also under no_grad)
        inplace = grad and inplace and logits.is_contiguous()
        valid = labels != o.ignore_index
        hits = (logits.argmax(-1) == labels) & valid if want.want_acc else None  # before any in-place gradient
        work = logits if inplace else logits.contiguous().clone() if grad else logits.contiguous()
        if grad:
            scale = row_scale(N, ce_den if scalar else 1.0, native_dtype(logits), logits.device)
            loss_rows, lse = ce_chunk(work, labels, scale, o)
            if inplace:  # the kernels wrote through the pointer: tell autograd the logits changed
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(work.detach() if inplace else work)
        else:
            loss_rows, lse = ce_chunk(work, labels, None, o)
        ctx.scalar = scalar
        loss = loss_rows.sum() / ce_den if scalar else loss_rows
        lse = torch.where(valid, lse, torch.zeros_like(lse))
        return outputs(ctx, loss, lse, hits, n_valid, opts.z_loss, z_den, scalar, None, N, want)

    @staticmethod
    def backward(ctx, grad_out, _gz, _gacc):
        (grad,) = ctx.saved_tensors
        g = grad_out if ctx.scalar else grad_out[:, None]
        return grad * g.to(grad.dtype), None, None, None, None, None, None, None
