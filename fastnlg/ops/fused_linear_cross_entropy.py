"""Fused linear + cross-entropy: the LM loss of logits = hidden @ weight.T (+ bias) without the (N, V) logits.
Semantics, options and per-row math: token_loss.py (shared with `cross_entropy`).

fused_linear_cross_entropy(hidden (N, C), weight (V, C), labels (N,)): ignored rows are dropped first (one
gather; no matmul work on them) where that saves COMPACT_MIN_MACS or more, then token chunks of `chunk_size`
rows run
    logits = h_c W^T (+ b)  ->  loss_c, and dlogits written in place  ->  dh_c = dlogits W,
    dW += dlogits^T h_c,  db += sum dlogits
so the working set is chunk x V, never N x V. For scalar reductions the gradients are computed in the
forward pass and scaled by grad_output in backward (3 matmuls, as eager); for reduction="none" backward
recomputes each chunk's logits (4 matmuls). dW accumulates in fp32 when the weight is fp16/bf16.
"""
from __future__ import annotations

import functools

import torch

from .._checks import check_same_device, check_same_dtype, check_tensor
from .._native import cast, native_dtype
from . import _amp
from .token_loss import (
    Extras,
    Opts,
    ce_chunk,
    check_class_weight,
    check_options,
    finish,
    outputs,
    prepare,
    row_scale,
    scatter_rows,
)

CPU_CHUNK_BUDGET = 256 * 2**20    # bytes of chunk working set (logits + fp32 temporaries)
CUDA_CHUNK_BUDGET = 1024 * 2**20
# Ignored rows are dropped (a gather of hidden rows, a scatter of their gradient) when that saves at least
# this many multiply-adds of the three matmuls per row (ignored x V x C): below it the gather and scatter
# cost more than the rows (a tiny model's few ignored rows).
COMPACT_MIN_MACS = 2**20


def drop_ignored(valid, n_valid, N, macs_per_row, *rows):
    """(idx, rows) of a chunked linear loss: the indices of the non-ignored rows and each of `rows` with only
    those, where dropping the ignored ones saves COMPACT_MIN_MACS multiply-adds or more (macs_per_row: one
    row's share of a matmul); else (None, rows as they are). valid None: no row is ignored (or torch.compile)."""
    if valid is None or (N - n_valid) * macs_per_row < COMPACT_MIN_MACS:
        return None, rows
    idx = torch.nonzero(valid).squeeze(-1)
    return idx, tuple(t.index_select(0, idx) for t in rows)


def auto_chunk_size(n_rows: int, V: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's logits + fp32 temporaries (~16 B per logit) fit the budget."""
    budget = CPU_CHUNK_BUDGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(CUDA_CHUNK_BUDGET, free // 4)
    return max(1, min(n_rows, budget // (16 * V)))


def _linear_ce_pass(h, weight, bias, y, scale, o: Opts, chunk, need_dh, need_dw, need_db, hits=None):
    """One pass over token chunks. scale (n,) fp32 or None (no gradients); `hits` (n,) bool, when given,
    gets argmax(logits) == label per row (read before the gradient overwrites the chunk)."""
    n = h.shape[0]
    acc = native_dtype(h)
    whole = chunk >= n  # one chunk: no slicing (a few us per slice and copy at small sizes)
    loss = lse = None  # (n,) each: the one chunk's own, or filled chunk by chunk
    if not whole or n == 0:
        loss = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty(n, dtype=acc, device=h.device)
    grads = scale is not None
    dh, dw, db = grad_buffers(h, weight, grads and need_dh, grads and need_dw, grads and need_db)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = h if whole else h[s:e]
        logits = torch.nn.functional.linear(hc, weight, bias)  # (chunk, V)
        if hits is not None:
            torch.eq(logits.argmax(-1), y[s:e], out=hits[s:e])
        if whole:
            loss, lse = ce_chunk(logits, y, scale, o)
        else:
            loss[s:e], lse[s:e] = ce_chunk(logits, y[s:e], None if scale is None else scale[s:e], o)
        if grads:
            chunk_grads(logits, hc, weight, None if dh is None else dh if whole else dh[s:e], dw, db, s == 0)
    return loss, lse, dh, dw, db


def grad_buffers(h, weight, need_dh, need_dw, need_db):
    """(dh, dW, db) buffers of a chunked linear loss (None where not needed): dW in fp32 for a fp16/bf16
    weight (chunk_grads accumulates there), db in the accumulation dtype."""
    low = weight.dtype in (torch.float16, torch.bfloat16)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.empty(weight.shape, dtype=torch.float32 if low else weight.dtype, device=h.device) if need_dw else None
    db = torch.empty(weight.shape[0], dtype=native_dtype(h), device=h.device) if need_db else None
    if h.shape[0] == 0:  # (the first chunk writes dW and db, later ones add; with no chunk they are 0)
        dw, db = (None if t is None else t.zero_() for t in (dw, db))
    return dh, dw, db


def chunk_grads(dlogits, hc, weight, dh_out, dw, db, first):
    """One chunk's part of a linear loss's gradients, from its logits' gradient dlogits (rows, V):
    dh_out <- dlogits W; dW (+)= dlogits^T hc; db (+)= sum dlogits (`first`: the first chunk overwrites).
    dW of a fp16/bf16 weight accumulates in fp32, from a matmul in the weight's dtype where that runs at
    full speed (fp32 accumulate, as eager's), else in fp32."""
    if dh_out is not None:
        torch.matmul(dlogits, weight, out=dh_out)
    if dw is not None:
        low = weight.dtype in (torch.float16, torch.bfloat16)
        if low and not _fast_matmul(weight.dtype, hc.device):  # (a CPU without it: the matmul in fp32)
            dw.addmm_(dlogits.t().float(), hc.float(), beta=0.0 if first else 1.0)
        elif low and first:  # a bf16/fp16 matmul into the fp32 buffer
            dw.copy_(dlogits.t() @ hc)
        elif low:
            dw.add_(dlogits.t() @ hc)
        else:
            dw.addmm_(dlogits.t(), hc, beta=0.0 if first else 1.0)  # (beta 0: overwrites, as out=)
    if db is not None:
        if first:
            torch.sum(dlogits.to(db.dtype), 0, out=db)
        else:
            db += dlogits.to(db.dtype).sum(0)


@functools.lru_cache(maxsize=None)
def _fast_matmul(dtype, device):
    """Whether a `dtype` (bf16/fp16) matmul runs at full speed on `device`: always on CUDA; on a CPU where
    oneDNN has native kernels for it (bf16 on AVX-512 CPUs, fp16 on AVX512-FP16/AMX ones), as eager's
    matmuls under autocast run there. Elsewhere torch's fallback is far slower than fp32
    (benchmarks/results/cpu-backend-choices.md)."""
    if device.type != "cpu":
        return True
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else
                    "_is_mkldnn_fp16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _one_on_cpu(grad_out):
    """grad_out is a CPU 1 (the usual loss.backward()), so the gradients need no scaling: read on the host
    only on the CPU, where that is free (on a GPU it would be a sync per step) and not under torch.compile."""
    return grad_out.device.type == "cpu" and not torch.compiler.is_compiling() and grad_out.item() == 1.0


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, reduction, opts, num_items, chunk_size, want, grad_mode):
        N, V = hidden.shape[0], weight.shape[0]
        valid, n_valid, ce_den, z_den, o = prepare("fused_linear_cross_entropy", labels, V, opts, reduction,
                                                   num_items, native_dtype(hidden))
        # (idx None: no row dropped; the kernels give ignored rows zero loss and gradient)
        idx, (h, y) = drop_ignored(valid, n_valid, N, V * hidden.shape[1], hidden, labels)
        h = h if h.stride(-1) == 1 else h.contiguous()
        chunk = chunk_size or auto_chunk_size(h.shape[0], V, h.device)
        hits = torch.empty(h.shape[0], dtype=torch.bool, device=h.device) if want.want_acc else None
        # needs_input_grad says requires_grad, also under no_grad: grad_mode (the caller's) says a backward can come
        need = tuple(grad_mode and n for n in (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                               bias is not None and ctx.needs_input_grad[2]))
        scalar = reduction != "none" or num_items is not None
        ctx.precomputed = any(need) and scalar
        if ctx.precomputed:
            scale = row_scale(h.shape[0], ce_den, native_dtype(h), h.device)
            loss_rows, lse, dh, dw, db = _linear_ce_pass(h, weight, bias, y, scale, o, chunk, *need, hits=hits)
            ctx.save_for_backward(idx, dh, dw, db)
        else:
            loss_rows, lse, *_ = _linear_ce_pass(h, weight, bias, y, None, o, chunk, False, False, False, hits=hits)
            ctx.save_for_backward(idx, hidden, weight, bias, labels)
        if idx is None and want.want_z:  # no row was dropped (none ignored, or under torch.compile): the
            lse = torch.where(y != o.ignore_index, lse, torch.zeros_like(lse))  # z-loss part skips the ignored
        ctx.N, ctx.chunk, ctx.opts, ctx.need = N, chunk, o, need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = loss_rows.sum() / ce_den if scalar else scatter_rows(loss_rows, idx, N)
        return outputs(ctx, loss, lse, hits, n_valid, opts.z_loss, z_den, scalar, idx, N, want)

    @staticmethod
    def backward(ctx, grad_out, _gz, _gacc):
        if ctx.precomputed:
            idx, dh, dw, db = ctx.saved_tensors
            g = None if _one_on_cpu(grad_out) else grad_out
        else:  # reduction="none": recompute each chunk with the per-row output gradients as scales
            idx, hidden, weight, bias, labels = ctx.saved_tensors
            h = hidden if idx is None else hidden.index_select(0, idx)
            y = labels if idx is None else labels.index_select(0, idx)
            g_rows = grad_out.expand(ctx.N) if grad_out.dim() == 0 else grad_out
            scale = (g_rows if idx is None else g_rows.index_select(0, idx)).to(native_dtype(h)).contiguous()
            _, _, dh, dw, db = _linear_ce_pass(h if h.stride(-1) == 1 else h.contiguous(), weight, bias, y, scale,
                                               ctx.opts, ctx.chunk, *ctx.need)
            g = None
        dtype_h, dtype_w, dtype_b = ctx.dtypes
        if dh is not None:
            dh = cast(scatter_rows(dh if g is None else dh * g.to(dh.dtype), idx, ctx.N), dtype_h)
        if dw is not None:
            dw = cast(dw if g is None else dw * g, dtype_w)
        if db is not None:
            db = cast(db if g is None else db * g, dtype_b)
        return dh, dw, db, None, None, None, None, None, None, None


def check_linear_inputs(op, hidden, weight, labels, bias, names=("hidden", "weight", "labels", "bias")):
    """The checks of a fused linear loss's hidden (N, C), weight (V, C), labels (N,) and bias (V,), under the
    caller's argument names (hidden already checked 2-D, before autocast casts it)."""
    nh, nw, ny, nb = names
    check_tensor(op, nw, weight, ndim=2)
    check_tensor(op, ny, labels, dtypes=(torch.int64, torch.int32), ndim=1)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: {nh} (N, C) = {tuple(hidden.shape)} and {nw} (V, C) = {tuple(weight.shape)} "
                         "must share C")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: {ny} {tuple(labels.shape)} must have one entry per row of {nh} {tuple(hidden.shape)}")
    if bias is not None:
        check_tensor(op, nb, bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: {nb} {tuple(bias.shape)} must have V = {weight.shape[0]} entries")
    check_same_dtype(op, **{nh: hidden, nw: weight})
    check_same_device(op, **{nh: hidden, nw: weight, ny: labels, nb: bias})


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ce_weight=None, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                               num_items_in_batch=None, chunk_size=None, return_z_loss=False,
                               return_token_accuracy=False, loss_dtype=None):
    """Loss of logits = hidden @ weight.T (+ bias) against labels, without materialising the logits.
    hidden (N, C), weight (V, C), labels (N,) already shifted/aligned; ce_weight (V,) class weights (Liger's
    name: `weight` is the projection); see the module docstring."""
    op = "fused_linear_cross_entropy"
    check_tensor(op, "hidden", hidden, ndim=2)
    amp = _amp.autocast_dtype(hidden.device.type)
    if amp is not None:  # the logits matmul as F.linear under autocast; the loss fp32, as F.cross_entropy's
        with _amp.autocast_off(hidden.device.type):
            return fused_linear_cross_entropy(
                hidden.to(amp), _amp.cast(weight, amp), labels, bias=_amp.cast(bias, amp), ce_weight=ce_weight,
                ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                z_loss=z_loss, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                loss_dtype=loss_dtype or torch.float32)
    check_linear_inputs(op, hidden, weight, labels, bias)
    check_class_weight(op, ce_weight, weight.shape[0], "ce_weight", labels)
    num_items = check_options(op, reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    want = Extras(bool(return_z_loss), bool(return_token_accuracy))
    opts = Opts(ignore_index, float(label_smoothing), float(softcap) if softcap else None, float(z_loss),
                 ce_weight, 0.0)
    loss, zpart, acc = _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels.long(), reduction, opts,
                                                      num_items, chunk_size, want, torch.is_grad_enabled())
    return finish(loss, zpart, acc, loss_dtype or hidden.dtype, want)
