"""Gated MLP (Llama/Mistral/Qwen SwiGLU, Gemma GeGLU): down(act(gate(x)) * up(x)) with the fused activation;
Phi-3's form, one gate_up_proj whose output halves are (gate, up), too."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..ops import geglu, swiglu


class FastGatedMLP(nn.Module):
    """eager_rounding: the activation rounds as eager does (see fastnlg.ops.glu), else once, in fp32."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None, eager_rounding: bool = False):
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.activation = activation
        self.eager_rounding = eager_rounding
        _activation_fn(activation)  # validate now, not at the first forward

    @classmethod
    def from_module(cls, module: nn.Module, activation: str, eager_rounding: bool = False) -> "FastGatedMLP":
        """Shares the projections of an HF MLP with gate_proj/up_proj/down_proj, or gate_up_proj/down_proj."""
        _activation_fn(activation)
        names = ("gate_up_proj", "down_proj") if hasattr(module, "gate_up_proj") else \
            ("gate_proj", "up_proj", "down_proj")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in names:
            setattr(new, name, getattr(module, name))
        new.activation, new.eager_rounding = activation, eager_rounding
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _activation_fn(self.activation)
        if "gate_up_proj" in self._modules:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(act(gate, up, eager_rounding=self.eager_rounding))


def _activation_fn(name: str):
    """HF activation names (config.hidden_act) -> fused gated op."""
    if name in ("silu", "swish"):
        return swiglu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return functools.partial(geglu, approximate="tanh")
    if name == "gelu":
        return functools.partial(geglu, approximate="none")
    raise ValueError(f"FastGatedMLP: unsupported activation {name!r} (silu, gelu, gelu_pytorch_tanh)")
