"""The token-loss machinery the loss ops share (cross_entropy.py, fused_linear_cross_entropy.py): options
and their checks, the label statistics and the reduction's denominators, the per-chunk kernels and their
backend table, and the outputs. Package-public: the loss ops build on these names.

Semantics (every loss op): F.cross_entropy on z = softcap * tanh(logits / softcap) (when softcap is set; 0 or
None is off), with class weights and label_smoothing as in torch, then the reduction: mean (over non-ignored
tokens, or over their summed class weights, as torch; 0, not NaN, when all are ignored), sum, none (0 at
ignored rows), or, with num_items_in_batch, sum / num_items_in_batch (HF Trainer's gradient-accumulation-exact
scaling). Plus Liger's z-loss: z_loss * lse^2 per non-ignored token, never class-weighted, averaged over the
non-ignored tokens under mean. The loss has the dtype F.cross_entropy returns (the input's; fp32 under
autocast), computed in fp32 (fp64 for fp64) inside; `loss_dtype` overrides it. return_z_loss /
return_token_accuracy give a CrossEntropyOutput(loss, z_loss, token_accuracy) whose two extras are detached,
for logging: the z-loss part of the loss, and argmax == label over non-ignored tokens (computed chunk by chunk
in the fused op, where the logits never exist whole).

Per row (derived in kernels/cross_entropy.py, gradchecked in fp64 in tests/ops/test_cross_entropy.py), with
class weights w (all 1 when none), W = sum w:
    loss = (1 - eps) w_y (lse - z_y) + eps / V (W lse - sum_v w_v z_v) + zl lse^2
    dloss/dz = softmax(z)((1 - eps) w_y + eps W / V + 2 zl lse) - (1 - eps) w_y onehot(y) - eps w / V;
    dz/dx = 1 - tanh^2(x / c)

Backends for the per-chunk loss (CHUNK_FNS): Triton (kernels/cross_entropy.py), C++
(csrc/cpu/cross_entropy.cpp, the CPU default: three vectorised sweeps per row, no (chunk, V) temporaries) and
torch (ce_chunk_torch).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backend as _backend
from .._checks import check_same_device, check_tensor
from .._native import cast, native_dtype, ptr, to_native

BACKENDS = ("torch", "triton", "cpp")
REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyOutput(NamedTuple):
    """What the losses return with return_z_loss / return_token_accuracy (the extras not asked for are None)."""
    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None


def denominators(reduction, num_items, n_valid, w_valid):
    """(denominator of the cross-entropy part, of the z-loss part) of the reduction. Weighted mean divides by
    the summed class weights of the non-ignored tokens as torch (NaN when they sum to 0, as torch); no
    non-ignored token at all gives 0 rather than torch's NaN."""
    if num_items is not None:  # a number, or a 0-dim tensor left on its device
        return num_items, num_items
    if reduction != "mean":
        return 1.0, 1.0
    if torch.is_tensor(n_valid):  # under torch.compile: the same, on the device
        n = n_valid.clamp(min=1).to(torch.float32)
        if w_valid is None:
            return n, n
        return torch.where(n_valid == 0, 1.0, torch.where(w_valid != 0, w_valid, float("nan"))), n
    if n_valid == 0:
        return 1.0, 1.0
    if w_valid is None:
        return float(n_valid), float(n_valid)
    return (w_valid if w_valid != 0 else float("nan")), float(n_valid)


class Opts(NamedTuple):
    """What every chunk kernel takes besides the rows: z_loss here is the per-row z weight the kernel uses
    (the user's, rescaled so that the z part is averaged over tokens while a weighted mean divides the rest
    by the summed class weights), class_weight (V,) in the accumulation dtype, its sum on the host."""
    ignore_index: int
    eps: float
    softcap: float | None
    z_loss: float
    class_weight: torch.Tensor | None
    weight_sum: float


def ce_chunk_torch(logits, labels, scale, o: Opts):
    """Torch twin of kernels/cross_entropy.forward: (loss, lse) per row; grad into logits if scale given."""
    x = logits.to(native_dtype(logits))
    eps, V, w = o.eps, logits.shape[-1], o.class_weight
    t = torch.tanh(x / o.softcap) if o.softcap is not None else None
    z = o.softcap * t if t is not None else x
    valid = labels != o.ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(z, dim=-1)
    zy = z.gather(-1, safe[:, None]).squeeze(-1)
    wy = 1.0 if w is None else w[safe]
    W = V if w is None else o.weight_sum
    smooth = eps / V * (W * lse - (z.sum(-1) if w is None else z @ w)) if eps > 0 else 0.0
    loss = (1 - eps) * wy * (lse - zy) + smooth + o.z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if scale is not None:
        g = torch.exp(z - lse[:, None]).mul_(((1 - eps) * wy + eps * W / V + 2 * o.z_loss * lse)[:, None])
        g.sub_(eps / V if w is None else (eps / V) * w)
        g.scatter_add_(-1, safe[:, None], (-(1 - eps) * wy * torch.ones_like(zy))[:, None])
        if t is not None:
            g.mul_(1 - t * t)
        g.mul_((scale * valid)[:, None])
        logits.copy_(g)
    return loss, lse


def ce_chunk_cpp(logits, labels, scale, o: Opts):
    """C++ twin: works in fp32/fp64 (fp16/bf16 chunks are upcast, and the gradient copied back)."""
    from fastnlg import _C

    acc = native_dtype(logits)
    work = logits if logits.dtype == acc and logits.stride(-1) == 1 else to_native(logits, acc)
    n, V = work.shape
    loss = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    labels = labels.contiguous()
    scale = None if scale is None else scale.to(acc).contiguous()
    _C.cross_entropy_fwd(ptr(work), ptr(labels), ptr(scale), ptr(loss), ptr(lse), n, V, work.stride(0),
                         o.ignore_index, o.eps, o.softcap or 0.0, o.z_loss, ptr(o.class_weight), acc == torch.float64)
    if scale is not None and work is not logits:
        logits.copy_(work)
    return loss, lse


def ce_chunk_triton(logits, labels, scale, o: Opts):
    from fastnlg.kernels import cross_entropy as k

    return k.forward(logits, labels, scale, o.ignore_index, o.eps, o.softcap, o.z_loss, o.class_weight, o.weight_sum)


CHUNK_FNS = {"torch": ce_chunk_torch, "cpp": ce_chunk_cpp, "triton": ce_chunk_triton}


def ce_chunk(logits, labels, scale, o: Opts):
    """(loss, lse) per row of a (n, V) chunk; with `scale` (n,) the scaled gradient overwrites logits. Under
    torch.compile, the torch twin (the compiler traces and fuses it; the kernels are opaque to it)."""
    if torch.compiler.is_compiling():
        return ce_chunk_torch(logits, labels, scale, o)
    return CHUNK_FNS[_backend.choose("cross_entropy", logits, BACKENDS)](logits, labels, scale, o)


def check_options(op, reduction, label_smoothing, softcap, z_loss, num_items_in_batch):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap >= 0:
        raise ValueError(f"{op}: softcap must be > 0, or 0 / None for off, got {softcap}")
    if z_loss < 0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if num_items_in_batch is None:
        return None
    if torch.is_tensor(num_items_in_batch):  # HF Trainer's: kept on its device, never read back (no sync)
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex():
            raise ValueError(f"{op}: num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.reshape(())
    n = float(num_items_in_batch)
    if not n > 0:
        raise ValueError(f"{op}: num_items_in_batch must be > 0, got {num_items_in_batch}")
    return n


def valid_rows(op, labels, V, ignore_index, class_weight=None):
    """(the non-ignored rows' bool mask or None when all are, their count, their summed class weight, the sum
    of all class weights); checks the label range in the same single host read. Under torch.compile there
    is no host read: the check is a device-side assert, the counts stay tensors, and no row is dropped
    (ignored rows get zero loss and gradient in the kernels)."""
    valid = labels != ignore_index
    if class_weight is None and labels.numel() and not torch.compiler.is_compiling():
        # the count and the range of the non-ignored labels in one host read (a third of the ops below)
        lo, hi = torch.aminmax(torch.where(valid, labels, 0))
        n_valid, lo, hi = torch.stack([valid.sum(), lo, hi]).tolist()
        if lo >= 0 and hi < V:
            return (valid if n_valid < labels.numel() else None), n_valid, None, 0.0
    bad = valid & ((labels < 0) | (labels >= V))
    counts = [valid.sum(), bad.sum()]
    if class_weight is not None:
        ok = valid & ~bad
        counts += [torch.where(ok, class_weight[torch.where(ok, labels, 0)], 0).sum(), class_weight.sum()]
    if torch.compiler.is_compiling():
        torch._assert_async(counts[1] == 0, f"{op}: a label outside [0, {V}) and not ignore_index={ignore_index}")
        return None, counts[0], *(counts[2:] if class_weight is not None else (None, 0.0))
    n_valid, n_bad, *sums = torch.stack([c.double() for c in counts]).tolist()
    if n_bad:
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{op}: {int(n_bad)} label(s) outside [0, {V}) and not ignore_index={ignore_index}; "
                         f"first at row {first}: {int(labels[first])}")
    n_valid = int(n_valid)
    return (valid if n_valid < labels.numel() else None), n_valid, (sums[0] if sums else None), \
        (sums[1] if sums else 0.0)


def scatter_rows(rows, idx, N):
    if idx is None:
        return rows
    out = rows.new_zeros((N,) + rows.shape[1:])
    return out.index_copy_(0, idx, rows)


class Extras(NamedTuple):
    """Which extras a loss call returns besides the loss (return_z_loss, return_token_accuracy)."""
    want_z: bool
    want_acc: bool


def prepare(op, labels, V, o: Opts, reduction, num_items, acc):
    """Host read of the label statistics; the denominators; the options the kernels run with."""
    cw = None if o.class_weight is None else o.class_weight.detach().to(acc).contiguous()
    valid, n_valid, w_valid, w_sum = valid_rows(op, labels, V, o.ignore_index, cw)
    ce_den, z_den = denominators(reduction, num_items, n_valid, w_valid)
    z_kernel = o.z_loss * ce_den / z_den if o.z_loss and num_items is None else o.z_loss  # one denominator
    return valid, n_valid, ce_den, z_den, o._replace(z_loss=z_kernel, class_weight=cw, weight_sum=w_sum)


def row_scale(n, denominator, dtype, device):
    """(n,) 1 / denominator per row, for the kernels; a tensor denominator stays on the device."""
    if torch.is_tensor(denominator):
        return torch.ones(n, dtype=dtype, device=device) / denominator.to(device=device, dtype=dtype)
    return torch.full((n,), 1.0 / denominator, dtype=dtype, device=device)


def outputs(ctx, loss, lse_valid, hits_valid, n_valid, z_loss, z_den, scalar, idx, N, want: Extras):
    """What the loss Functions return: (loss, z-loss part, token accuracy), the two extras detached (0-dim
    placeholders when not asked for) from the non-ignored rows' lse and hits."""
    zpart, acc = loss.new_zeros(()), loss.new_zeros(())  # (two tensors: torch.compile traces the Function so)
    if want.want_z:
        rows = (z_loss * lse_valid * lse_valid).detach()
        zpart = rows.sum() / z_den if scalar else scatter_rows(rows, idx, N)
    if want.want_acc:
        if scalar and torch.is_tensor(n_valid):  # (torch.compile)
            acc = torch.where(n_valid > 0, hits_valid.sum().float() / n_valid.clamp(min=1), float("nan"))
        elif scalar:
            acc = hits_valid.sum().float() / n_valid if n_valid else torch.tensor(float("nan"),
                                                                                 device=hits_valid.device)
        else:
            acc = scatter_rows(hits_valid.float(), idx, N)
    ctx.mark_non_differentiable(zpart, acc)
    return loss, zpart, acc


def finish(loss, zpart, acc, dtype, want: Extras):
    """The public return: the loss in `dtype` alone, or a CrossEntropyOutput when extras were asked for."""
    loss = cast(loss, dtype)
    if not (want.want_z or want.want_acc):
        return loss
    return CrossEntropyOutput(loss, zpart.to(dtype) if want.want_z else None, acc if want.want_acc else None)


def check_class_weight(op, class_weight, V, name, like):
    if class_weight is None:
        return
    check_tensor(op, name, class_weight, ndim=1)
    if class_weight.shape[0] != V:
        raise ValueError(f"{op}: {name} {tuple(class_weight.shape)} must have one entry per class, V = {V}")
    check_same_device(op, **{name: class_weight, "labels": like})
