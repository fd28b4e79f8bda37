"""Eager calls of fastnlg's custom ops without torch.library's autograd layer.

Each op is a `torch.library.custom_op` with a fake implementation and `register_autograd(backward,
setup_context)`: what torch.compile, opcheck, fake tensors and the meta device need. In eager mode that path
costs a few dispatcher round trips in Python per call (about 50-80 us on a CPU: most of the difference between
a patched and an unpatched tiny model's training step). `eager_op(op, setup_context, backward)` returns a
callable that runs the op's own implementation inside a plain torch.autograd.Function with the same
setup_context and backward in eager mode on plain CPU/CUDA tensors, and the custom op itself otherwise
(under torch.compile, for tensor subclasses, fake or meta tensors); `eager_call(op)` does the same for the
backward ops. Same computation, same gradients. The ops are declared with `custom_op(name)` below, which
keeps a handle on each op's implementation (torch's CustomOpDef does not offer one publicly).
"""
from __future__ import annotations

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


def eager_op(op, setup_context, backward):
    """A callable running custom op `op` (a forward op with registered autograd): see the module docstring."""
    impl = _impl(op)

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    # named for the op (its backward node reads e.g. rms_norm_fwd_eagerBackward in profiles and grad_fn)
    _Function = type(f"{op._name}_eager", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(lambda ctx, *g: backward(ctx, *g))})

    def call(*args):
        if torch.compiler.is_compiling() or not _plain(args):
            return op(*args)
        return _Function.apply(*args)

    return call
