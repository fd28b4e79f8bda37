"""Gated MLP (Llama/Mistral/Qwen SwiGLU, Gemma GeGLU): down(act(gate(x)) * up(x)) with the fused activation;
Phi-3's form, one gate_up_proj whose output halves are (gate, up), too. GPT-2's MLP: c_proj(gelu(x W + b))
with c_fc's bias fused into the GELU."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..ops import geglu, gelu, swiglu


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


# Transformers' activation modules (ACT2FN) whose function fastnlg.ops.gelu computes -> its approximate
GELU_APPROXIMATE = {"NewGELUActivation": "tanh", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh",
                    "FastGELUActivation": "tanh", "GELUActivation": "none"}


class FastGPT2MLP(nn.Module):
    """GPT-2's MLP, dropout(c_proj(gelu(c_fc(x)))), over the same c_fc / c_proj / dropout modules: with c_fc a
    Conv1D, x W runs as a plain matmul and its bias is added inside fastnlg.ops.gelu (one pass for bias and
    activation, GPT-2's gelu_new otherwise being ~8 elementwise ops each way); any other c_fc (a PEFT LoRA
    layer, ...) runs as it is, followed by the fused activation."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastGPT2MLP":
        """Shares c_fc, c_proj and dropout of a GPT2MLP; its activation module names the GELU."""
        activation = type(module.act).__name__
        if activation not in GELU_APPROXIMATE or (activation == "GELUActivation" and
                                                  getattr(module.act, "act", None) is not nn.functional.gelu):
            raise ValueError(f"FastGPT2MLP: unsupported activation {activation} ({', '.join(GELU_APPROXIMATE)})")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.c_fc, new.c_proj, new.dropout = module.c_fc, module.c_proj, module.dropout
        new.activation, new.approximate = activation, GELU_APPROXIMATE[activation]
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc = self.c_fc
        if type(fc).__name__ == "Conv1D" and fc.bias is not None:  # transformers.pytorch_utils.Conv1D
            h = torch.matmul(x, fc.weight)  # (as F.linear under autocast: both in the autocast dtype)
            h = gelu(h, fc.bias.to(h.dtype), approximate=self.approximate)
        else:
            h = gelu(fc(x), approximate=self.approximate)
        return self.dropout(self.c_proj(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
