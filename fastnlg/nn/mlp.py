"""Gated MLP (Llama/Mistral/Qwen SwiGLU, Gemma GeGLU): down(act(gate(x)) * up(x)) with the fused activation;
Phi-3's form, one gate_up_proj whose output halves are (gate, up), too. GPT-2's MLP: c_proj(gelu(x W + b))
with c_fc's bias fused into the GELU."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..ops import geglu, gelu, swiglu
from ..ops.gelu import gelu_backend


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


def gelu_approximate(owner: str, act: nn.Module) -> str:
    """fastnlg.ops.gelu's `approximate` for a Transformers activation module, or ValueError naming it
    (GELUActivation counts only when it runs torch's erf GELU, not its Python fallback)."""
    name = type(act).__name__
    if name not in GELU_APPROXIMATE or (name == "GELUActivation" and getattr(act, "act", None) is not nn.functional.gelu):
        raise ValueError(f"{owner}: unsupported activation {name} ({', '.join(GELU_APPROXIMATE)})")
    return GELU_APPROXIMATE[name]


class FastDenseGELU(nn.Module):
    """BERT's intermediate layer, act(dense(x)) with a GELU (BertIntermediate, RobertaIntermediate): dense's
    bias is added inside fastnlg.ops.gelu (one pass for bias and activation); a dense that is not a plain
    nn.Linear (a PEFT LoRA layer, ...) runs as it is, followed by the fused activation."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastDenseGELU":
        """Shares dense (and keeps intermediate_act_fn, which holds no parameters) of the module."""
        approximate = gelu_approximate("FastDenseGELU", module.intermediate_act_fn)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dense, new.intermediate_act_fn, new.approximate = module.dense, module.intermediate_act_fn, approximate
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dense = self.dense
        if not torch.compiler.is_compiling() and gelu_backend(hidden_states, self.approximate) == "torch":
            return self.intermediate_act_fn(dense(hidden_states))  # (aten's GELU: the eager computation itself)
        if type(dense) is nn.Linear and dense.bias is not None:
            h = nn.functional.linear(hidden_states, dense.weight)  # (under autocast: in the autocast dtype)
            return gelu(h, dense.bias.to(h.dtype), approximate=self.approximate)
        return gelu(dense(hidden_states), approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class FastGPT2MLP(nn.Module):
    """GPT-2's MLP, dropout(c_proj(gelu(c_fc(x)))), over the same c_fc / c_proj / dropout modules: with c_fc a
    Conv1D, x W runs as a plain matmul and its bias is added inside fastnlg.ops.gelu (one pass for bias and
    activation, GPT-2's gelu_new otherwise being ~8 elementwise ops each way); any other c_fc (a PEFT LoRA
    layer, ...) runs as it is, followed by the fused activation."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastGPT2MLP":
        """Shares c_fc, c_proj and dropout of a GPT2MLP; its activation module names the GELU."""
        approximate = gelu_approximate("FastGPT2MLP", module.act)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.c_fc, new.c_proj, new.dropout = module.c_fc, module.c_proj, module.dropout
        new.activation, new.approximate = type(module.act).__name__, approximate
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
