"""LoRA layers run by fastnlg.ops.lora_linear: over a PEFT LoRA layer (base nn.Linear, GPT-2's Conv1D, fastnlg's
NF4Linear or bitsandbytes 4-bit Linear4bit), or standalone.

`peft_state(layer)` reads what a PEFT `lora.Linear` computes *now*: the frozen base weight (dense tensor, or the
Linear4bit's bytes viewed as an NF4Weight: no copy, no re-quantisation), its bias, and the active adapters'
Parameters, scalings and dropout. It follows PEFT's forward: merged or disabled adapters mean the base layer
alone (PEFT's disable also unmerges first), otherwise every active adapter is summed. What lora_linear cannot
run exactly - DoRA and other LoRA variants, a LoRA bias, non-nn.Dropout dropout, a mixed-adapter batch
(`adapter_names=`), an FP4 base - raises `UnsupportedLoRA` with the reason, so the patcher reports it and
keeps PEFT's path: never silently different.

`peft_lora_forward(layer, x)` is PEFT's forward computed by lora_linear from that live state; since the layer
stays PEFT's own module, set_adapter, merge/unmerge, save_pretrained and merge_and_unload keep working.
`LoRALinear.from_peft(layer)` is a standalone module over the same Parameters (a snapshot of which adapters
are active; training it updates PEFT's adapters in place); `merge()` gives the dense weight for export.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from ..ops.lora_linear import lora_linear


class UnsupportedLoRA(ValueError):
    """This PEFT layer uses an option lora_linear does not implement (the message says which)."""


class PeftState(NamedTuple):
    weight: object  # dense tensor (detached) or NF4Weight
    bias: torch.Tensor | None
    lora_A: list  # Parameters, one per adapter summed
    lora_B: list
    scaling: list
    dropout_p: list


def _dropout_p(module, name) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    raise UnsupportedLoRA(f"adapter {name!r}: lora_dropout is a {type(module).__name__}, not nn.Dropout / "
                          "nn.Identity")


_NF4_VIEWS: dict = {}  # id(param) -> (weakref to the param, (data pointer, quant_state id, layout), NF4Weight)


def _nf4_view(param):
    """The NF4Weight over a Params4bit's bytes, cached per parameter until its data, quant_state or layout
    changes (bitsandbytes' CPU repacking replaces the data and edits the quant_state in place).
    (Keyed by id with a weakref check: a WeakKeyDictionary would compare tensors with ==.)"""
    from ..quant import NF4Weight

    key = (param.data.data_ptr(), id(param.quant_state), getattr(param.quant_state, "packing_format_for_cpu", False))
    hit = _NF4_VIEWS.get(id(param))
    if hit is None or hit[0]() is not param or hit[1] != key:
        for stale in [k for k, v in _NF4_VIEWS.items() if v[0]() is None]:
            del _NF4_VIEWS[stale]
        hit = _NF4_VIEWS[id(param)] = (weakref.ref(param), key, NF4Weight.from_bnb(param))
    return hit[2]


def _base_weight(base):
    if getattr(getattr(base, "weight", None), "quant_state", None) is not None or type(base).__name__ == "Linear4bit":
        state = getattr(base.weight, "quant_state", None)
        if state is None or state.quant_type != "nf4":
            raise UnsupportedLoRA("4-bit base is not a quantised NF4 weight (FP4, or not moved to its device)")
        weight = _nf4_view(base.weight)
        if tuple(weight.shape) != (base.out_features, base.in_features):
            raise UnsupportedLoRA(f"4-bit weight of shape {tuple(weight.shape)} is not (out, in)")
        return weight
    if isinstance(base, nn.Linear):
        return base.weight.detach()
    if type(base).__name__ == "NF4Linear":
        return base.weight
    if type(base).__name__ == "Conv1D" and getattr(base, "weight", None) is not None and base.weight.dim() == 2:
        return base.weight.detach().t()  # GPT-2's projections: y = x W + b with W stored (in, out)
    raise UnsupportedLoRA(f"base layer {type(base).__name__} is not nn.Linear, Conv1D, bnb Linear4bit or "
                          "NF4Linear")


def peft_state(layer) -> PeftState:
    """What the PEFT LoRA layer computes now, as lora_linear arguments (see the module docstring)."""
    base = layer.get_base_layer()
    weight = _base_weight(base)
    bias = base.bias.detach() if base.bias is not None and not base.bias.requires_grad else base.bias
    if layer.disable_adapters or layer.merged:
        return PeftState(weight, bias, [], [], [], [])
    state = PeftState(weight, bias, [], [], [], [])
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue  # PEFT skips active adapters this layer does not have
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            raise UnsupportedLoRA(f"adapter {name!r} is a LoRA variant (DoRA or similar), not implemented by "
                                  "lora_linear")
        if getattr(layer, "lora_bias", {}).get(name, False):
            raise UnsupportedLoRA(f"adapter {name!r}: lora_bias=True is not implemented by lora_linear")
        state.lora_A.append(layer.lora_A[name].weight)
        state.lora_B.append(layer.lora_B[name].weight)
        state.scaling.append(float(layer.scaling[name]))
        state.dropout_p.append(_dropout_p(layer.lora_dropout[name], name))
    return state


def _run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
    """lora_linear in the dense base weight's dtype (never copying W), or x's dtype over an NF4 base; the
    adapters (often fp32 in PEFT) are cast differentiably, so their fp32 Parameters get the gradients."""
    dtype = weight.dtype if torch.is_tensor(weight) else x.dtype
    y = lora_linear(x.to(dtype), weight, [a.to(dtype) for a in lora_A], [b.to(dtype) for b in lora_B],
                    scaling=list(scaling), bias=None if bias is None else bias.to(dtype),
                    dropout_p=list(dropout_p) if training else 0.0)
    return y.to(x.dtype)


def peft_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's `lora.Linear.forward(x)` computed by lora_linear from the layer's live state."""
    if args or any(v is not None for v in kwargs.values()):
        raise UnsupportedLoRA(f"forward arguments {sorted(kwargs)} (mixed-adapter batches) are PEFT's path")
    if layer.disable_adapters and layer.merged:
        layer.unmerge()  # as PEFT's forward does
    return _run(x, *peft_state(layer), layer.training)


class LoRALinear(nn.Module):
    """y = x W^T + b + sum_i s_i B_i A_i dropout_i(x) through lora_linear; W frozen (dense tensor or NF4Weight,
    not a Parameter of this module), lora_A / lora_B ParameterLists (one entry per adapter)."""

    def __init__(self, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0):
        super().__init__()
        several = not isinstance(lora_A, torch.Tensor)
        self.base_weight = weight
        self.bias = bias
        self.lora_A = nn.ParameterList(lora_A if several else [lora_A])
        self.lora_B = nn.ParameterList(lora_B if several else [lora_B])
        n = len(self.lora_A)
        self.scaling = [float(s) for s in scaling] if isinstance(scaling, (list, tuple)) else [float(scaling)] * n
        self.dropout_p = [float(p) for p in dropout_p] if isinstance(dropout_p, (list, tuple)) \
            else [float(dropout_p)] * n
        self._peft_layer = [None]  # a list, so the PEFT layer is not registered as a submodule of this one

    @classmethod
    def from_peft(cls, layer) -> "LoRALinear":
        """Over the PEFT layer's Parameters, with the adapters active now (see peft_state)."""
        new = cls(*peft_state(layer))
        new._peft_layer[0] = layer
        return new

    def to_peft(self):
        """The PEFT layer this module was built from (its Parameters hold the trained adapters)."""
        return self._peft_layer[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(x, self.base_weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.dropout_p,
                    self.training)

    @torch.no_grad()
    def merge(self, dtype=None) -> torch.Tensor:
        """The dense weight W + sum_i s_i B_i A_i (for export); W dequantised when it is NF4."""
        w = self.base_weight
        dtype = dtype or (self.lora_A[0].dtype if len(self.lora_A) else torch.float32)
        merged = w.dequantize(dtype) if not torch.is_tensor(w) else w.to(dtype, copy=True)
        for A, B, s in zip(self.lora_A, self.lora_B, self.scaling):
            merged += s * (B.to(dtype) @ A.to(dtype))
        return merged

    def extra_repr(self) -> str:
        ranks = [A.shape[0] for A in self.lora_A]
        return (f"r={ranks}, scaling={self.scaling}, dropout={self.dropout_p}, "
                f"base={'nf4' if not torch.is_tensor(self.base_weight) else 'dense'}")
