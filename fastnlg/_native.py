"""What the ops share about native dtypes: the accumulation dtype of a tensor (fp64 for fp64, else fp32: the
references and the kernels compute in it), and the helpers of the C++ CPU path, whose kernels take fp32/fp64
raw pointers (fp16/bf16 tensors are upcast once here and results cast back by the caller)."""
from __future__ import annotations

import torch


def native_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype for `t`: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def to_native(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Contiguous copy (only if needed) of `t` in the native kernel dtype."""
    return None if t is None else contiguous(cast(t, dtype))


# The two helpers below skip calls that would return `t` itself: an op's Python runs on every call, a few
# times per layer, and t.to(t.dtype) still costs ~0.7 us of argument parsing, t.view(t.shape) ~1.8 us.
def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype)."""
    return t if t.dtype == dtype else t.to(dtype)


def shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t.view(shape)."""
    return t if t.shape == shape else t.view(shape)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def rows(x: torch.Tensor) -> torch.Tensor:
    """(…, C) -> (N, C) with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


_ROUND_CODES = {torch.bfloat16: 1, torch.float16: 2}


def round_code(dtype: torch.dtype) -> int:
    """How the C++ kernels round an intermediate to `dtype` (csrc/cpu/fastnlg_cpu.h's round_to): 1 bfloat16,
    2 half, 0 none (fp32/fp64 computations keep their values)."""
    return _ROUND_CODES.get(dtype, 0)


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def dtype_code(dtype: torch.dtype) -> int:
    """How the C++ kernels that read fp16/bf16 in place name a storage dtype (csrc/cpu/fastnlg_cpu.h: DT_*)."""
    return _DTYPE_CODES[dtype]


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """t.contiguous(), without the call when it already is."""
    return t if t.is_contiguous() else t.contiguous()
