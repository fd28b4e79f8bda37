"""The op scaffold (`define_op`), and eager calls of its custom ops without torch.library's autograd layer.

Each kernel op is a pair of `torch.library.custom_op`s, `fastnlg::<name>_fwd` with registered autograd and
`fastnlg::<name>_bwd`, each with a fake implementation: what torch.compile, opcheck, fake tensors and the
meta device need. `define_op` declares the pair from the op's functions and returns the callables the op's
public function and its gradient formula call. In eager mode that path
costs a few dispatcher round trips in Python per call (about 50-80 us on a CPU: most of the difference between
a patched and an unpatched tiny model's training step). `eager_op(op, setup_context, backward)` returns a
callable that runs the op's own implementation inside a plain torch.autograd.Function with the same
setup_context and backward in eager mode on plain CPU/CUDA tensors, and the custom op itself otherwise
(under torch.compile, for tensor subclasses, fake or meta tensors); `eager_call(op)` does the same for the
backward ops. Same computation, same gradients. `custom_op(name)` keeps a handle on each op's implementation
(torch's CustomOpDef does not offer one publicly).

The composite ops (cross_entropy, fused_linear_cross_entropy, flash_attention, lora_linear) are
torch.autograd.Functions instead: README, "Adding an op", says why.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


def _plain(args, _types=(torch.Tensor, torch.nn.Parameter)) -> bool:
    """Every tensor argument a plain tensor (or Parameter) on the CPU or a CUDA device (a loop, not all() over a
    generator: this runs on every op call)."""
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _types or not (a.is_cpu or a.is_cuda)):
            return False
    return True


_IMPLS: dict = {}  # custom op -> the Python function that implements it


def custom_op(name: str):
    """@torch.library.custom_op(name, mutates_args=()) that also records the decorated implementation."""
    def declare(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op
    return declare


def _impl(op):
    impl = _IMPLS.get(op)
    if impl is None:
        raise TypeError(f"{op}: declare it with fastnlg.ops._eager.custom_op, which keeps its implementation")
    return impl


def eager_call(op):
    """A callable running custom op `op` (no autograd of its own: a backward op) as its implementation in
    eager mode on plain tensors, and as the op otherwise."""
    impl = _impl(op)

    def call(*args):
        if torch.compiler.is_compiling() or not _plain(args):
            return op(*args)
        return impl(*args)

    return call


def eager_op(op, setup_context, backward, name: str | None = None):
    """A callable running custom op `op` (a forward op with registered autograd): see the module docstring."""
    impl = _impl(op)

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    # named for the op (its backward node reads e.g. rms_norm_fwd_eagerBackward in profiles and grad_fn)
    _Function = type(f"{name or impl.__name__.lstrip('_')}_eager", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(lambda ctx, *g: backward(ctx, *g))})

    def call(*args):
        if torch.compiler.is_compiling() or not _plain(args):
            return op(*args)
        return _Function.apply(*args)

    return call


class Op(NamedTuple):
    """What define_op returns: the callables (eager fast path, or the custom op) and the two custom ops."""
    forward: Callable
    backward: Callable
    forward_op: object
    backward_op: object


def define_op(name: str, forward, forward_fake, backward, backward_fake, setup_context, gradients) -> Op:
    """The scaffold of a kernel op `name`: `forward(*inputs)` becomes `fastnlg::<name>_fwd` with `forward_fake`
    and autograd (setup_context(ctx, inputs, output) saves what the gradients need; gradients(ctx,
    *grad_outputs) returns one gradient or None per input, calling `Op.backward`), and `backward(...)` becomes
    `fastnlg::<name>_bwd` with `backward_fake`. Both functions dispatch to the op's backend table and carry
    the type annotations torch.library reads the schema from."""
    fwd = custom_op(f"fastnlg::{name}_fwd")(forward)
    fwd.register_fake(forward_fake)
    bwd = custom_op(f"fastnlg::{name}_bwd")(backward)
    bwd.register_fake(backward_fake)
    fwd.register_autograd(gradients, setup_context=setup_context)
    return Op(eager_op(fwd, setup_context, gradients, f"{name}_fwd"), eager_call(bwd), fwd, bwd)
