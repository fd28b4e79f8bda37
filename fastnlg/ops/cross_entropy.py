"""Cross-entropy and fused linear + cross-entropy (the LM loss without the (N, V) logits).

Semantics (both ops): F.cross_entropy on z = softcap * tanh(logits / softcap) (when softcap is set), with
label_smoothing as in torch, plus z_loss * lse^2 per non-ignored token, then the reduction:
mean over non-ignored tokens (0, not NaN, when all are ignored), sum, none (0 at ignored rows), or, with
num_items_in_batch, sum / num_items_in_batch (HF Trainer's gradient-accumulation-exact scaling).

Per row (derived in kernels/cross_entropy.py, gradchecked in fp64 in tests/ops/test_cross_entropy.py):
    loss = (1 - eps)(lse - z_y) + eps (lse - mean z) + zl lse^2
    dloss/dz = softmax(z)(1 + 2 zl lse) - (1 - eps) onehot(y) - eps / V;  dz/dx = 1 - tanh^2(x / c)

fused_linear_cross_entropy(hidden (N, C), weight (V, C), labels (N,)): ignored rows are dropped first (one
gather; no matmul work on them), then token chunks of `chunk_size` rows run
    logits = h_c W^T (+ b)  ->  loss_c, and dlogits written in place  ->  dh_c = dlogits W,
    dW += dlogits^T h_c,  db += sum dlogits
so the working set is chunk x V, never N x V. For scalar reductions the gradients are computed in the
forward pass and scaled by grad_output in backward (3 matmuls, as eager); for reduction="none" backward
recomputes each chunk's logits (4 matmuls). dW accumulates in fp32 when the weight is fp16/bf16.
Backends for the per-chunk loss: Triton (kernels/cross_entropy.py), C++ (csrc/cpu/cross_entropy.cpp, the
CPU default: three vectorised sweeps per row, no (chunk, V) temporaries) and torch (below).
"""
from __future__ import annotations


import torch

from .. import backend as _backend
from . import _amp
from ._checks import check_same_device, check_same_dtype, check_tensor
from ._dispatch import native_dtype, ptr, to_native

BACKENDS = ("torch", "triton", "cpp")
REDUCTIONS = ("mean", "sum", "none")
CPU_CHUNK_BUDGET = 256 * 2**20    # bytes of chunk working set (logits + fp32 temporaries)
CUDA_CHUNK_BUDGET = 1024 * 2**20


def cross_entropy_reference(logits, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                            softcap=None, z_loss=0.0, num_items_in_batch=None):
    """The spec, in plain torch (fp32, or fp64 for fp64 logits)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, safe[:, None]).squeeze(-1)
    smooth = label_smoothing * (lse - z.mean(-1)) if label_smoothing > 0 else 0.0  # no 0 * inf (-inf logits)
    loss = (1 - label_smoothing) * nll + smooth + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, valid.sum(), reduction, num_items_in_batch)


def _reduce(loss_rows, n_valid, reduction, num_items_in_batch):
    if num_items_in_batch is not None:
        return loss_rows.sum() / num_items_in_batch
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / torch.clamp(torch.as_tensor(n_valid, device=loss_rows.device), min=1)


_acc = native_dtype  # accumulation dtype: fp64 for fp64 inputs, else fp32


def _ce_chunk_torch(logits, labels, scale, ignore_index, eps, softcap, z_loss):
    """Torch twin of kernels/cross_entropy.forward: (loss, lse) per row; grad into logits if scale given."""
    x = logits.to(_acc(logits))
    t = torch.tanh(x / softcap) if softcap is not None else None
    z = softcap * t if t is not None else x
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(z, dim=-1)
    zy = z.gather(-1, safe[:, None]).squeeze(-1)
    loss = (1 - eps) * (lse - zy) + (eps * (lse - z.mean(-1)) if eps > 0 else 0.0) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if scale is not None:
        g = torch.exp(z - lse[:, None]).mul_((1 + 2 * z_loss * lse)[:, None]).sub_(eps / z.shape[-1])
        g.scatter_add_(-1, safe[:, None], torch.full_like(zy[:, None], -(1 - eps)))
        if t is not None:
            g.mul_(1 - t * t)
        g.mul_((scale * valid)[:, None])
        logits.copy_(g)
    return loss, lse


def _ce_chunk_cpp(logits, labels, scale, ignore_index, eps, softcap, z_loss):
    """C++ twin: works in fp32/fp64 (fp16/bf16 chunks are upcast, and the gradient copied back)."""
    from fastnlg import _C

    acc = _acc(logits)
    work = logits if logits.dtype == acc and logits.stride(-1) == 1 else to_native(logits, acc)
    n, V = work.shape
    loss = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    labels = labels.contiguous()
    scale = None if scale is None else scale.to(acc).contiguous()
    _C.cross_entropy_fwd(ptr(work), ptr(labels), ptr(scale), ptr(loss), ptr(lse), n, V, work.stride(0),
                         ignore_index, eps, softcap or 0.0, z_loss, acc == torch.float64)
    if scale is not None and work is not logits:
        logits.copy_(work)
    return loss, lse


_CHUNK_FNS = {"torch": _ce_chunk_torch, "cpp": _ce_chunk_cpp}


def _ce_chunk(logits, labels, scale, ignore_index, eps, softcap, z_loss):
    """(loss, lse) per row of a (n, V) chunk; with `scale` (n,) the scaled gradient overwrites logits."""
    backend = _backend.choose("cross_entropy", logits, BACKENDS)
    if backend == "triton":
        from fastnlg.kernels import cross_entropy as k

        return k.forward(logits, labels, scale, ignore_index, eps, softcap, z_loss)
    return _CHUNK_FNS[backend](logits, labels, scale, ignore_index, eps, softcap, z_loss)


def _check_options(op, reduction, label_smoothing, softcap, z_loss, num_items_in_batch):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap}")
    if z_loss < 0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if num_items_in_batch is not None:
        n = float(num_items_in_batch)
        if not n > 0:
            raise ValueError(f"{op}: num_items_in_batch must be > 0, got {num_items_in_batch}")
        return n
    return None


def _valid_rows(op, labels, V, ignore_index):
    """Indices of non-ignored rows; checks label range in the same single host read."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{op}: {n_bad} label(s) outside [0, {V}) and not ignore_index={ignore_index}; "
                         f"first at row {first}: {int(labels[first])}")
    return torch.nonzero(valid).squeeze(-1) if n_valid < labels.numel() else None, n_valid


def auto_chunk_size(n_rows: int, V: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's logits + fp32 temporaries (~16 B per logit) fit the budget."""
    budget = CPU_CHUNK_BUDGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(CUDA_CHUNK_BUDGET, free // 4)
    return max(1, min(n_rows, budget // (16 * V)))


def _linear_ce_pass(h, weight, bias, y, scale, opts, chunk, need_dh, need_dw, need_db):
    """One pass over token chunks. scale (n,) fp32 or None (no gradients)."""
    n, V = h.shape[0], weight.shape[0]
    acc = _acc(h)
    loss = torch.empty(n, dtype=acc, device=h.device)
    lse = torch.empty(n, dtype=acc, device=h.device)
    grads = scale is not None
    low = weight.dtype in (torch.float16, torch.bfloat16)
    dh = torch.empty_like(h) if grads and need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32 if low else weight.dtype, device=h.device) if grads and need_dw else None
    db = torch.zeros(V, dtype=acc, device=h.device) if grads and need_db else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = h[s:e]
        logits = torch.nn.functional.linear(hc, weight, bias)  # (chunk, V)
        loss[s:e], lse[s:e] = _ce_chunk(logits, y[s:e], None if scale is None else scale[s:e], *opts)
        if not grads:
            continue
        if dh is not None:
            torch.matmul(logits, weight, out=dh[s:e])
        if dw is not None:
            if low and h.device.type == "cpu":  # CPU half-precision matmul is slow: accumulate in fp32
                dw.addmm_(logits.t().float(), hc.float())
            elif low:  # CUDA: bf16/fp16 tensor-core matmul (fp32 accumulate), added into the fp32 buffer
                dw.add_(logits.t() @ hc)
            else:
                dw.addmm_(logits.t(), hc)
        if db is not None:
            db += logits.to(acc).sum(0)
    return loss, lse, dh, dw, db


def _scatter_rows(rows, idx, N):
    if idx is None:
        return rows
    out = rows.new_zeros((N,) + rows.shape[1:])
    return out.index_copy_(0, idx, rows)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, eps, softcap, z_loss, num_items, chunk_size):
        N, V = hidden.shape[0], weight.shape[0]
        idx, n_valid = _valid_rows("fused_linear_cross_entropy", labels, V, ignore_index)
        h = hidden if idx is None else hidden.index_select(0, idx)
        y = labels if idx is None else labels.index_select(0, idx)
        h = h if h.stride(-1) == 1 else h.contiguous()
        chunk = chunk_size or auto_chunk_size(h.shape[0], V, h.device)
        opts = (ignore_index, eps, softcap, z_loss)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        scalar = reduction != "none" or num_items is not None
        ctx.precomputed = any(need) and scalar  # needs_input_grad is False for all under no_grad
        if ctx.precomputed:
            denom = num_items if num_items is not None else (max(n_valid, 1) if reduction == "mean" else 1.0)
            scale = torch.full((h.shape[0],), 1.0 / denom, dtype=_acc(h), device=h.device)
            loss_rows, _, dh, dw, db = _linear_ce_pass(h, weight, bias, y, scale, opts, chunk, *need)
            ctx.save_for_backward(idx, dh, dw, db)
        else:
            loss_rows, _, *_ = _linear_ce_pass(h, weight, bias, y, None, opts, chunk, False, False, False)
            ctx.save_for_backward(idx, hidden, weight, bias, labels)
        ctx.N, ctx.chunk, ctx.opts, ctx.need = N, chunk, opts, need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if num_items is not None:
            return loss_rows.sum() / num_items
        if reduction == "none":
            return _scatter_rows(loss_rows, idx, N)
        if reduction == "sum":
            return loss_rows.sum()
        return loss_rows.sum() / max(n_valid, 1)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precomputed:
            idx, dh, dw, db = ctx.saved_tensors
            g = grad_out  # always scaled: testing grad_out == 1 on the host would be a GPU sync per step
        else:  # reduction="none": recompute each chunk with the per-row output gradients as scales
            idx, hidden, weight, bias, labels = ctx.saved_tensors
            h = hidden if idx is None else hidden.index_select(0, idx)
            y = labels if idx is None else labels.index_select(0, idx)
            g_rows = grad_out.expand(ctx.N) if grad_out.dim() == 0 else grad_out
            scale = (g_rows if idx is None else g_rows.index_select(0, idx)).to(_acc(h)).contiguous()
            _, _, dh, dw, db = _linear_ce_pass(h if h.stride(-1) == 1 else h.contiguous(), weight, bias, y, scale,
                                               ctx.opts, ctx.chunk, *ctx.need)
            g = None
        dtype_h, dtype_w, dtype_b = ctx.dtypes
        if dh is not None:
            dh = _scatter_rows(dh if g is None else dh * g.to(dh.dtype), idx, ctx.N).to(dtype_h)
        if dw is not None:
            dw = (dw if g is None else dw * g).to(dtype_w)
        if db is not None:
            db = (db if g is None else db * g).to(dtype_b)
        return dh, dw, db, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, softcap=None, z_loss=0.0, num_items_in_batch=None,
                               chunk_size=None):
    """Loss of logits = hidden @ weight.T (+ bias) against labels, without materialising the logits.
    hidden (N, C), weight (V, C), labels (N,) already shifted/aligned; see the module docstring."""
    op = "fused_linear_cross_entropy"
    check_tensor(op, "hidden", hidden, ndim=2)
    amp = _amp.autocast_dtype(hidden.device.type)
    if amp is not None:  # the logits matmul as F.linear under autocast; the loss itself stays fp32 inside
        with _amp.autocast_off(hidden.device.type):
            return fused_linear_cross_entropy(
                hidden.to(amp), _amp.cast(weight, amp), labels, bias=_amp.cast(bias, amp), ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
                num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    check_tensor(op, "weight", weight, ndim=2)
    check_tensor(op, "labels", labels, dtypes=(torch.int64, torch.int32), ndim=1)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden (N, C) = {tuple(hidden.shape)} and weight (V, C) = {tuple(weight.shape)} "
                         "must share C")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must have one entry per row of hidden {tuple(hidden.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias {tuple(bias.shape)} must have V = {weight.shape[0]} entries")
    check_same_dtype(op, hidden=hidden, weight=weight)
    check_same_device(op, hidden=hidden, weight=weight, labels=labels, bias=bias)
    num_items = _check_options(op, reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels.long(), ignore_index, reduction,
                                          float(label_smoothing), None if softcap is None else float(softcap),
                                          float(z_loss), num_items, chunk_size)


def cross_entropy(logits, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None,
                  z_loss=0.0, num_items_in_batch=None, inplace_backward=False):
    """Cross-entropy on logits (N, V): one online log-sum-exp pass per row; the gradient is computed in
    the forward pass into a fresh (N, V) buffer, or, with inplace_backward=True, into the logits' own memory
    (saves N x V; the logits' values are gone afterwards, and autograd's version counter is bumped so any
    other use of them in backward raises instead of reading gradients)."""
    op = "cross_entropy"
    check_tensor(op, "logits", logits, ndim=2)
    check_tensor(op, "labels", labels, dtypes=(torch.int64, torch.int32), ndim=1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must have one entry per row of logits {tuple(logits.shape)}")
    check_same_device(op, logits=logits, labels=labels)
    num_items = _check_options(op, reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    return _CrossEntropy.apply(logits, labels.long(), ignore_index, reduction, float(label_smoothing),
                               None if softcap is None else float(softcap), float(z_loss), num_items,
                               bool(inplace_backward))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, eps, softcap, z_loss, num_items, inplace):
        _, n_valid = _valid_rows("cross_entropy", labels, logits.shape[1], ignore_index)
        opts = (ignore_index, eps, softcap, z_loss)
        scalar = reduction != "none" or num_items is not None
        grad = ctx.needs_input_grad[0]
        inplace = grad and inplace and logits.is_contiguous()
        work = logits if inplace else logits.contiguous().clone() if grad else logits.contiguous()
        if grad:
            denom = num_items if num_items is not None else (max(n_valid, 1) if reduction == "mean" and scalar else 1.0)
            scale = torch.full((logits.shape[0],), 1.0 / denom, dtype=_acc(logits), device=logits.device)
            loss_rows, _ = _ce_chunk(work, labels, scale, *opts)
            if inplace:  # the kernels wrote through the pointer: tell autograd the logits changed
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(work.detach() if inplace else work)
        else:
            loss_rows, _ = _ce_chunk(work, labels, None, *opts)
        ctx.scalar = scalar
        return _reduce(loss_rows, n_valid, reduction, num_items)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = grad_out if ctx.scalar else grad_out[:, None]
        return grad * g.to(grad.dtype), None, None, None, None, None, None, None, None


