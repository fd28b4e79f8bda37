"""The one place that decides which implementation runs an op.

Rule (DESIGN.md §2):
- CUDA tensors  -> Triton (``cuda`` where an op has a CUDA kernel and it is faster);
- CPU tensors   -> Triton when ``TRITON_INTERPRET=1`` (how CI runs the kernels), else the C++
                   extension where the op has one, else the plain-torch reference;
- ``FASTNLG_BACKEND=torch|triton|cpp|cuda`` overrides, and a backend that cannot run on the given
  tensors is a clear error, never a silent fallback.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def has_cpp() -> bool:
    try:
        from fastnlg import _C  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def has_cuda_ext() -> bool:
    try:
        from fastnlg import _C_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend() -> str | None:
    value = os.environ.get("FASTNLG_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"FASTNLG_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _unusable_reason(backend: str, tensor: torch.Tensor) -> str | None:
    """Why `backend` cannot run on `tensor` here, or None when it can."""
    device = tensor.device
    if backend == "triton":
        if tensor.dtype == torch.float64:
            return "the Triton kernels compute in fp32 and take fp16/bf16/fp32 tensors, not float64"
        if not has_triton():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpret():
            return f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run them on CPU"
        if device.type == "cuda" and triton_interpret():
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
    elif backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors (got {device})"
        if not has_cpp():
            return "the C++ extension fastnlg._C is not built (pip install -e . builds it)"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA backend runs on CUDA tensors (got {device})"
        if not has_cuda_ext():
            return "the CUDA extension fastnlg._C_cuda is not built (FASTNLG_BUILD_CUDA=1 pip install -e .)"
    return None


def choose(op: str, tensor: torch.Tensor, available: tuple[str, ...], cpu_default_cpp: bool = True) -> str:
    """Backend for one call of `op` on `tensor`'s device; `available` lists what `op` implements.
    `cpu_default_cpp=False` keeps an op's C++ kernel opt-in (FASTNLG_BACKEND=cpp) where it measured
    slower than the torch reference on CPU."""
    device = tensor.device
    requested = requested_backend()
    if requested is not None:
        if requested not in available:
            raise ValueError(
                f"{op}: FASTNLG_BACKEND={requested!r} is not implemented for this op "
                f"(it has: {', '.join(available)})"
            )
        reason = _unusable_reason(requested, tensor)
        if reason:
            raise ValueError(f"{op}: FASTNLG_BACKEND={requested!r} cannot run here: {reason}")
        return requested
    if device.type == "cuda":
        order = ("cuda", "triton", "torch")
    elif triton_interpret():
        order = ("triton", "cpp", "torch")
    else:
        order = ("cpp", "torch") if cpu_default_cpp else ("torch",)
    for backend in order:
        if backend in available and _unusable_reason(backend, tensor) is None:
            return backend
    return "torch"
