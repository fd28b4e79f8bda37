"""LoRALinear: a PEFT LoRA layer (over nn.Linear or a bitsandbytes 4-bit Linear4bit) run by fastnlg.ops.lora_linear.

`LoRALinear.from_peft(layer)` shares PEFT's own Parameters (lora_A/lora_B weights, the base bias) and the base
weight (dense tensor, or the Linear4bit's bytes viewed as an NF4Weight: no copy, no re-quantisation), so
training updates PEFT's adapter in place and `save_pretrained` writes PEFT's format unchanged; `to_peft()`
gives the original layer back. What lora_linear cannot run exactly - DoRA, several active adapters, merged
weights, a LoRA bias, non-dropout dropout modules - raises `UnsupportedLoRA` with the reason, so the patcher
reports it and keeps PEFT's path: never silently different.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_linear import lora_linear


class UnsupportedLoRA(ValueError):
    """This PEFT layer uses an option lora_linear does not implement (the message says which)."""


def _dropout_p(module) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    raise UnsupportedLoRA(f"lora_dropout is a {type(module).__name__}, not nn.Dropout / nn.Identity")


class LoRALinear(nn.Module):
    def __init__(self, weight, bias, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float, dropout_p=0.0):
        super().__init__()
        self.base_weight = weight  # dense tensor (frozen) or NF4Weight; not a Parameter of this module
        self.bias = bias
        self.lora_A, self.lora_B = lora_A, lora_B
        self.scaling, self.dropout_p = float(scaling), float(dropout_p)
        self._peft_layer = None

    @classmethod
    def from_peft(cls, layer, adapter: str | None = None) -> "LoRALinear":
        from ..quant import NF4Weight

        active = list(getattr(layer, "active_adapters", []) or [])
        adapter = adapter or (active[0] if active else "default")
        if len(active) > 1:
            raise UnsupportedLoRA(f"{len(active)} active adapters {active}; lora_linear runs one")
        if getattr(layer, "merged", False):
            raise UnsupportedLoRA("the adapter is merged into the base weight; unmerge it first")
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise UnsupportedLoRA("DoRA (use_dora=True) is not implemented by lora_linear")
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            raise UnsupportedLoRA("lora_bias=True is not implemented by lora_linear")
        base = layer.get_base_layer()
        if getattr(base.weight, "quant_state", None) is not None or type(base).__name__ == "Linear4bit":
            # bnb Linear4bit (an nn.Linear subclass): its packed bytes as an NF4Weight, no copy
            state = getattr(base.weight, "quant_state", None)
            if state is None or state.quant_type != "nf4":
                raise UnsupportedLoRA("4-bit base is not a quantised NF4 weight (FP4, or not moved to its device)")
            weight = NF4Weight.from_bnb(base.weight)
            if tuple(weight.shape) != (base.out_features, base.in_features):
                raise UnsupportedLoRA(f"4-bit weight of shape {tuple(weight.shape)} is not (out, in)")
        elif isinstance(base, nn.Linear):
            weight = base.weight.detach()
        else:
            raise UnsupportedLoRA(f"base layer {type(base).__name__} is not nn.Linear or bnb Linear4bit")
        new = cls(weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                  layer.scaling[adapter], _dropout_p(layer.lora_dropout[adapter]))
        new._peft_layer = layer
        return new

    def to_peft(self):
        """The PEFT layer this module was built from (its Parameters hold the trained adapter)."""
        return self._peft_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes in the dense base weight's dtype (never copying W), or x's dtype over an NF4 base; the
        adapter (often fp32 in PEFT) is cast differentiably, so its fp32 Parameters get the gradients."""
        dense = torch.is_tensor(self.base_weight)
        dtype = self.base_weight.dtype if dense else x.dtype
        cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
        y = lora_linear(x.to(dtype), self.base_weight, cast(self.lora_A), cast(self.lora_B), scaling=self.scaling,
                        bias=cast(self.bias), dropout_p=self.dropout_p if self.training else 0.0)
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self, dtype=None) -> torch.Tensor:
        """The dense weight W + s B A (for export); W dequantised when it is NF4."""
        w = self.base_weight
        dtype = dtype or self.lora_A.dtype
        dense = w.dequantize(dtype) if not torch.is_tensor(w) else w.to(dtype)
        return dense + self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        return (f"r={self.lora_A.shape[0]}, scaling={self.scaling}, dropout={self.dropout_p}, "
                f"base={'nf4' if not torch.is_tensor(self.base_weight) else 'dense'}")
