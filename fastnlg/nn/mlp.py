"""Gated MLP (Llama/Mistral/Qwen SwiGLU, Gemma GeGLU): down(act(gate(x)) * up(x)) with the fused activation."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import geglu, swiglu


class FastGatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.activation = activation
        _activation_fn(activation)  # validate now, not at the first forward

    @classmethod
    def from_module(cls, module: nn.Module, activation: str) -> "FastGatedMLP":
        """Shares the projections of an HF MLP with gate_proj/up_proj/down_proj."""
        _activation_fn(activation)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = module.gate_proj, module.up_proj, module.down_proj
        new.activation = activation
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_activation_fn(self.activation)(self.gate_proj(x), self.up_proj(x)))


def _activation_fn(name: str):
    """HF activation names (config.hidden_act) -> fused gated op."""
    if name in ("silu", "swish"):
        return swiglu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda g, u: geglu(g, u, approximate="tanh")
    if name == "gelu":
        return lambda g, u: geglu(g, u, approximate="none")
    raise ValueError(f"FastGatedMLP: unsupported activation {name!r} (silu, gelu, gelu_pytorch_tanh)")
