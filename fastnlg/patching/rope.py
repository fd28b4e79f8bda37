"""The rope swap: a family's modelling module's apply_rotary_pos_emb (a module-level function shared by every
model of that family) -> fastnlg.ops.apply_rope where a call is one it takes, else the original. Reference
counted (swaps.py): the original comes back when no live patched model holds the module any more."""
from __future__ import annotations

import inspect

from . import swaps


def rope_function(original):
    from ..ops import apply_rope

    signature = inspect.signature(original)  # (q, k, cos, sin, [position_ids,] unsqueeze_dim=1) by version
    params = list(signature.parameters.values())
    four = [(p.name, p.kind) for p in params[:4]] == [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                      for n in ("q", "k", "cos", "sin")] and all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[4:])
    # (four: the four tensors alone are a complete call, binding as q, k, cos, sin)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """fastnlg.ops.apply_rope (with the call's unsqueeze_dim 1 or 2, position_ids, partial rotary) where
        the tensors are what it takes (4-D q, k of one dtype, constant cos/sin), else the original function."""
        if four and not args and not kwargs:  # how the modelling code calls it: nothing more to bind
            bound = {}
        else:
            try:
                bound = signature.bind(q, k, cos, sin, *args, **kwargs).arguments
            except TypeError:
                bound = None
        extra = set(bound or ()) - {"q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"}
        unsqueeze_dim = (bound or {}).get("unsqueeze_dim", 1)
        standard = (bound is not None and not extra and unsqueeze_dim in (1, 2) and q.dim() == 4 and k.dim() == 4
                    and q.dtype == k.dtype and cos.dim() in (2, 3) and cos.shape[-1] <= q.shape[-1]
                    and k.shape[-1] == q.shape[-1] and not cos.requires_grad and not sin.requires_grad)
        if standard:
            return apply_rope(q, k, cos, sin, position_ids=bound.get("position_ids"), unsqueeze_dim=unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def hold(name, state):
    """`state`'s model uses the fused apply_rotary_pos_emb of modelling module `name` until it is unpatched
    or garbage-collected."""
    swaps.hold(name, "apply_rotary_pos_emb", rope_function, state)


def release(name, state):
    """Drops `state`'s hold (None: one that was garbage-collected)."""
    swaps.release(name, "apply_rotary_pos_emb", state)
