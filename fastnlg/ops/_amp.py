"""Autocast for the fused ops that replace matmuls (lora_linear, fused_linear_cross_entropy,
flash_attention): under `torch.autocast` they compute in the autocast dtype, as F.linear / matmul / SDPA
would, so a patched model under autocast matches the unpatched one under the same autocast. The floating
inputs are cast (differentiably: fp32 Parameters get fp32 gradients, as with autocast) and the op then runs
with autocast off, so its own internal matmuls and fp32 accumulations are not re-cast."""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str):
    """The dtype torch.autocast casts matmul inputs to on this device type now, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t, dtype):
    """t in dtype when it is a floating tensor (None and integer tensors unchanged)."""
    return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t


def autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False) if autocast_dtype(device_type) else contextlib.nullcontext()
