"""Norm modules: drop-in for LlamaRMSNorm-style modules (weight, variance_epsilon) and nn.LayerNorm."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import layer_norm, rms_norm


class FastRMSNorm(nn.Module):
    """RMSNorm with `weight` (C,); offset=1.0 gives Gemma's (1 + weight) scaling; casting_mode "gemma"
    (fp32 throughout, one rounding) or "llama" (x_hat rounded to x's dtype before the multiply, as
    LlamaRMSNorm): see fastnlg.ops.rms_norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, device=None, dtype=None,
                 casting_mode: str = "gemma"):
        super().__init__()
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode

    @classmethod
    def from_module(cls, module: nn.Module, offset: float = 0.0, casting_mode: str = "gemma") -> "FastRMSNorm":
        """Shares `module.weight` (no copy); reads eps from `variance_epsilon` or `eps`."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight, new.variance_epsilon, new.offset = module.weight, float(eps), offset
        new.casting_mode = casting_mode
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.offset, casting_mode=self.casting_mode)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}, " \
               f"casting_mode={self.casting_mode!r}"


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dim, computed by fastnlg.ops.layer_norm (needs elementwise_affine)."""

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> "FastLayerNorm":
        if len(module.normalized_shape) != 1 or module.weight is None:
            raise ValueError(f"FastLayerNorm needs a 1-D affine LayerNorm, got {module}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = module.normalized_shape, module.eps, True
        new.weight, new.bias = module.weight, module.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class FastT5LayerNorm(nn.Module):
    """T5LayerNorm (T5, Flan-T5, mT5, UMT5) on fastnlg.ops.rms_norm, rounding as T5's: the variance in fp32;
    x * rstd cast to the weight's dtype when that is fp16/bf16 (then times the weight), else kept in fp32 (the
    output fp32, as T5's promotion gives). Shares the module's weight."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastT5LayerNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight, new.variance_epsilon = module.weight, module.variance_epsilon
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype in (torch.float16, torch.bfloat16):
            if x.dtype == w.dtype:  # x_hat rounded to x's (= w's) dtype, then times w: the llama mode
                return rms_norm(x, w, self.variance_epsilon, casting_mode="llama")
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)  # (mixed dtypes, rare: T5's own steps)
            return w * (x * torch.rsqrt(variance + self.variance_epsilon)).to(w.dtype)
        if x.dtype != w.dtype:
            x = x.to(torch.promote_types(x.dtype, w.dtype))  # T5: bf16 x * fp32 rstd promotes, the output stays fp32
        return rms_norm(x, w, self.variance_epsilon, casting_mode="gemma")
