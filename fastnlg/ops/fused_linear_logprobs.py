"""Per-token log-probabilities (and entropies) of logits = hidden @ weight.T (+ bias), without the (N, V) logits:
the primitive of the preference and RL losses (fastnlg.losses), as the fused loss is the SFT one's.

fused_linear_logprobs(hidden (N, C), weight (V, C), labels (N,)) -> logp (N,) [, entropy (N,)]:
    z = (hidden W^T + b) / T;  logp_i = log_softmax(z_i)[y_i];  H_i = -sum_v p_iv log p_iv;  both 0 where y_i
    is ignore_index. Computed in fp32 (fp64 for fp64), returned in that dtype, as TRL's selective_log_softmax.
Per row, with the output gradients a_i (of logp) and b_i (of H) (gradchecked in fp64 in
tests/ops/test_fused_linear_logprobs.py; kernels/logprobs.py derives the online form):
    dlogits_iv = (a_i ([v == y_i] - p_iv) - b_i p_iv (z_iv - E_i)) / T,   E_i = sum_v p_iv z_iv = lse_i - H_i
    dh = dlogits W,  dW = dlogits^T h,  db = sum_i dlogits_i
Chunks of `chunk_size` token rows bound the working set to chunk x V; ignored rows are dropped first where
that pays (fused_linear_cross_entropy's rule). The output is per token, so its gradient is known only in
backward; what runs when:
- the weight (and bias) frozen (LoRA, QLoRA: the usual preference run) and hidden requiring grad: the forward
  writes each chunk's d logp / d logits in place and keeps dh_logp = dlogits W (N x C, the size of hidden);
  backward scales it by a: two matmuls in all, as eager's forward + backward. An entropy gradient adds a
  recompute (two matmuls) in backward.
- the weight trainable: backward recomputes each chunk's logits with a and b (four matmuls: eager's three,
  plus the recompute that keeps the logits from ever existing whole).
- no gradient (a reference model, under no_grad): one matmul per chunk, nothing kept.
Backends for the per-chunk rows (CHUNK_FNS): Triton (kernels/logprobs.py), C++ (csrc/cpu/logprobs.cpp, the CPU
default) and torch (lp_chunk_torch); under torch.compile the torch twin (traced and fused by the compiler).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import check_tensor
from .._native import cast, native_dtype, ptr, to_native
from . import _amp
from .fused_linear_cross_entropy import auto_chunk_size, check_linear_inputs, chunk_grads, drop_ignored, grad_buffers
from .token_loss import scatter_rows, valid_rows

BACKENDS = ("torch", "triton", "cpp")
OP = "fused_linear_logprobs"


def fused_linear_logprobs_reference(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                                    return_entropy=False):
    """The spec, in plain torch on materialised logits (the matmul in the inputs' dtype, the rest in fp32, or
    fp64 for fp64)."""
    acc = native_dtype(hidden)
    z = torch.nn.functional.linear(hidden, weight, bias).to(acc) / temperature
    valid = labels != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).long()[:, None]).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    ent = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)  # (a -inf logit adds nothing)
    return logp, torch.where(valid, ent, torch.zeros_like(ent))


def lp_chunk_torch(logits, labels, inv_t, ignore_index, ga, gb):
    """Torch twin of kernels/logprobs.forward: (logp, entropy) per row; with ga / gb (n,) or either None, the
    logits' gradient overwrites logits."""
    z = logits.to(native_dtype(logits)) * inv_t
    valid = labels != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    d = z - lse[:, None]  # log p
    p = d.exp()
    plogp = torch.where(p > 0, p * d, torch.zeros_like(p))
    ent = torch.where(valid, -plogp.sum(-1), torch.zeros_like(lse))
    logp = torch.where(valid, d.gather(-1, torch.where(valid, labels, 0)[:, None]).squeeze(-1), torch.zeros_like(lse))
    if ga is not None or gb is not None:
        g = torch.zeros_like(z)
        if gb is not None:  # -b p (z - E) = -b p (log p + H)
            g = torch.where(p > 0, -(p * (d + ent[:, None])) * gb[:, None], g)
        if ga is not None:
            g = g - p * ga[:, None]
            g = g.scatter_add(-1, torch.where(valid, labels, 0)[:, None], ga[:, None].to(g.dtype))
        logits.copy_(torch.where(valid[:, None], g * inv_t, torch.zeros_like(g)))
    return logp, ent


def lp_chunk_cpp(logits, labels, inv_t, ignore_index, ga, gb):
    """C++ twin: works in fp32/fp64 (fp16/bf16 chunks are upcast, and the gradient copied back)."""
    from fastnlg import _C

    acc = native_dtype(logits)
    work = logits if logits.dtype == acc and logits.stride(-1) == 1 else to_native(logits, acc)
    n, V = work.shape
    logp = torch.empty(n, dtype=acc)
    ent = torch.empty(n, dtype=acc)
    ga, gb = (None if g is None else g.to(acc).contiguous() for g in (ga, gb))
    _C.logprobs_rows(ptr(work), ptr(labels.contiguous()), ptr(logp), ptr(ent), ptr(ga), ptr(gb), n, V,
                     work.stride(0), ignore_index, inv_t, acc == torch.float64)
    if (ga is not None or gb is not None) and work is not logits:
        logits.copy_(work)
    return logp, ent


def lp_chunk_triton(logits, labels, inv_t, ignore_index, ga, gb):
    from fastnlg.kernels import logprobs as k

    ga, gb = (None if g is None else g.float().contiguous() for g in (ga, gb))
    return k.forward(logits, labels, inv_t, ignore_index, ga, gb)


CHUNK_FNS = {"torch": lp_chunk_torch, "cpp": lp_chunk_cpp, "triton": lp_chunk_triton}


def lp_chunk(logits, labels, inv_t, ignore_index, ga=None, gb=None):
    if torch.compiler.is_compiling():
        return lp_chunk_torch(logits, labels, inv_t, ignore_index, ga, gb)
    return CHUNK_FNS[_backend.choose(OP, logits, BACKENDS)](logits, labels, inv_t, ignore_index, ga, gb)


def chunk_stats(logits, labels, inv_t, out):
    """What TRL's fused head logs of each row (without gradient), into out (n, 3): the mean of z = logits / T,
    log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z), and whether the label is the (first) argmax."""
    z = logits.to(native_dtype(logits)) * inv_t
    out[:, 0] = z.mean(-1)
    out[:, 1] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    out[:, 2] = z.argmax(-1) == labels


def _pass(h, weight, bias, y, inv_t, ignore_index, chunk, ga, gb, need_dh, need_dw, need_db, stats=None):
    """One pass over token chunks: (logp, entropy) per row, and, with row gradients ga / gb (either may be
    None), the gradients asked for (dh, dW, db); `stats` (n, 3), when given, gets chunk_stats."""
    n = h.shape[0]
    acc = native_dtype(h)
    grads = ga is not None or gb is not None
    logp = torch.empty(n, dtype=acc, device=h.device)
    ent = torch.empty(n, dtype=acc, device=h.device)
    dh, dw, db = grad_buffers(h, weight, grads and need_dh, grads and need_dw, grads and need_db)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = h[s:e]
        logits = torch.nn.functional.linear(hc, weight, bias)  # (chunk, V)
        if stats is not None:  # (before the kernel writes the gradient over the logits)
            chunk_stats(logits, y[s:e], inv_t, stats[s:e])
        logp[s:e], ent[s:e] = lp_chunk(logits, y[s:e], inv_t, ignore_index,
                                       None if ga is None else ga[s:e], None if gb is None else gb[s:e])
        if grads:
            chunk_grads(logits, hc, weight, None if dh is None else dh[s:e], dw, db, s == 0)
    return logp, ent, dh, dw, db


def _rows(g, idx, dtype):
    """The compacted rows' part of an output gradient (None stays None: that output was not used)."""
    if g is None:
        return None
    g = g if idx is None else g.index_select(0, idx)
    return g.to(dtype).contiguous()


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, ignore_index, chunk_size, grad_mode, want_stats):
        ctx.set_materialize_grads(False)  # an unused output (the entropy, for logging) costs nothing in backward
        N, V = hidden.shape[0], weight.shape[0]
        valid, n_valid, _, _ = valid_rows(OP, labels, V, ignore_index)
        idx, (h, y) = drop_ignored(valid, n_valid, N, V * hidden.shape[1], hidden, labels)
        h = h if h.stride(-1) == 1 else h.contiguous()
        chunk = chunk_size or auto_chunk_size(h.shape[0], V, h.device)
        need = tuple(grad_mode and n for n in (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                               bias is not None and ctx.needs_input_grad[2]))
        ctx.precomputed = need[0] and not (need[1] or need[2])
        stats = torch.zeros(h.shape[0] if want_stats else 0, 3, dtype=torch.float32, device=h.device)
        if ctx.precomputed:  # frozen head: d logp / dh now, with unit row gradients; backward scales it
            ones = torch.ones(h.shape[0], dtype=native_dtype(h), device=h.device)
            logp, ent, dh_logp, _, _ = _pass(h, weight, bias, y, inv_t, ignore_index, chunk, ones, None, True,
                                             False, False, stats if want_stats else None)
            ctx.save_for_backward(idx, dh_logp, hidden, weight, bias, labels)
        else:
            logp, ent, *_ = _pass(h, weight, bias, y, inv_t, ignore_index, chunk, None, None, False, False, False,
                                  stats if want_stats else None)
            ctx.save_for_backward(idx, None, hidden, weight, bias, labels)
        stats = scatter_rows(stats, idx, N) if want_stats else stats
        ctx.mark_non_differentiable(stats)
        ctx.N, ctx.inv_t, ctx.ignore_index, ctx.chunk, ctx.need = N, inv_t, ignore_index, chunk, need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return scatter_rows(logp, idx, N), scatter_rows(ent, idx, N), stats

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_stats):
        idx, dh_logp, hidden, weight, bias, labels = ctx.saved_tensors
        acc = native_dtype(hidden)
        ga, gb = _rows(g_logp, idx, acc), _rows(g_ent, idx, acc)
        dh = dw = db = None
        if ga is None and gb is None:
            return (None,) * 9
        if ctx.precomputed:
            if ga is not None:
                dh = (dh_logp.to(acc) * ga[:, None]).to(dh_logp.dtype)
            ga = None  # (its part is done)
        if ga is not None or gb is not None:
            h = hidden if idx is None else hidden.index_select(0, idx)
            y = labels if idx is None else labels.index_select(0, idx)
            _, _, dh2, dw, db = _pass(h if h.stride(-1) == 1 else h.contiguous(), weight, bias, y, ctx.inv_t,
                                      ctx.ignore_index, ctx.chunk, ga, gb, *ctx.need)
            dh = dh2 if dh is None else dh if dh2 is None else dh + dh2
        dtype_h, dtype_w, dtype_b = ctx.dtypes
        if dh is not None:
            dh = cast(scatter_rows(dh, idx, ctx.N), dtype_h)
        return dh, None if dw is None else cast(dw, dtype_w), None if db is None else cast(db, dtype_b), \
            None, None, None, None, None, None


def fused_linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None, return_stats=False):
    """log_softmax((hidden @ weight.T + bias) / temperature)[labels] per row (N,), fp32 (fp64 for fp64), 0 where
    labels == ignore_index, without the (N, V) logits; with return_entropy=True also the entropy (N,) of the
    same distribution. Gradients flow to hidden, weight and bias through both. return_stats=True (what TRL's
    fused head logs) returns (logp, entropy, mean logit, log sum p^2, label is the argmax), the last three
    without gradient (meaningful on the non-ignored rows; TRL masks the others). See the module docstring."""
    check_tensor(OP, "hidden", hidden, ndim=2)
    amp = _amp.autocast_dtype(hidden.device.type)
    if amp is not None:  # the logits matmul as F.linear under autocast; the rest in fp32
        with _amp.autocast_off(hidden.device.type):
            return fused_linear_logprobs(hidden.to(amp), _amp.cast(weight, amp), labels, bias=_amp.cast(bias, amp),
                                         temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=return_entropy, chunk_size=chunk_size,
                                         return_stats=return_stats)
    check_linear_inputs(OP, hidden, weight, labels, bias)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"{OP}: temperature must be a number > 0, got {temperature!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be >= 1, got {chunk_size}")
    logp, ent, stats = _FusedLinearLogprobs.apply(hidden, weight, bias, labels.long(), 1.0 / float(temperature),
                                                  int(ignore_index), chunk_size, torch.is_grad_enabled(),
                                                  bool(return_stats))
    if return_stats:
        return logp, ent, stats[:, 0], stats[:, 1], stats[:, 2].bool()
    return (logp, ent) if return_entropy else logp
