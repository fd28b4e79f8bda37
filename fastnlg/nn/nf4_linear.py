"""NF4Linear: a frozen linear layer stored in NF4 (fastnlg.quant), the base layer of QLoRA where bitsandbytes
cannot run (CPU, or a machine without it). Its tensors are buffers, so `.to(device)` and state_dict follow
the module; forward is `lora_linear` with no adapters (dequantised tile by tile, never a dense copy of W kept
for backward). PEFT wraps it as a LoRA layer's `base_layer` (see `quantize_linears`), so adapters train,
save and load in PEFT's format, and `peft_state` hands the NF4 weight itself to the fused LoRA op.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_linear import lora_linear


class NF4Linear(nn.Module):
    def __init__(self, weight, bias=None):
        """weight: an NF4Weight of shape (out, in); bias: a tensor or None (frozen, kept in its dtype)."""
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.shape, self.orig_dtype, self.blocksize = tuple(weight.shape), weight.dtype, weight.blocksize
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("absmax2", weight.absmax2)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        from ..quant import quantize_nf4

        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant), linear.bias)

    @property
    def weight(self):
        """The NF4Weight over this module's buffers (no copy)."""
        from ..quant import NF4Weight

        return NF4Weight(self.packed, self.absmax, self.shape, self.orig_dtype, self.blocksize, self.offset,
                         self.absmax2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, [], [], scaling=[],
                           bias=None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.absmax2 is not None}")


def quantize_linears(model: nn.Module, skip=("lm_head",)) -> list:
    """Replaces every frozen nn.Linear of `model` (PEFT LoRA layers' base layers included; adapters and the
    modules named in `skip` excluded) by an NF4Linear, in place; returns the replaced names."""
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or child.weight.requires_grad or any(s in full.split(".") for s in skip):
                continue
            if child.in_features % 2 or ".lora_" in f".{full}":
                continue
            setattr(module, child_name, NF4Linear.from_linear(child))
            done.append(full)
    return done
