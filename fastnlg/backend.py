"""The one place that decides which implementation runs an op.

Rule (DESIGN.md §2):
- CUDA tensors  -> Triton (``cuda`` where an op has a CUDA kernel and it is faster);
- CPU tensors   -> Triton when ``TRITON_INTERPRET=1`` (how CI runs the kernels), else the C++
                   extension where the op has one, else the plain-torch reference;
- ``FASTNLG_BACKEND_<OP>=torch|triton|cpp|cuda`` (e.g. ``FASTNLG_BACKEND_RMS_NORM=cpp``) overrides one op:
  a backend the op does not have, or one that cannot run on the given tensors, is a clear error;
- ``FASTNLG_BACKEND=...`` overrides every op that has that backend, so it can be set for a whole model:
  an op without it keeps its default and says so once (a warning naming the op); one that has it but
  cannot run it on the given tensors is an error, never a silent fallback.
The variables are read once, at the first op call: `use(...)` changes them for a block, `refresh()` re-reads them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")


_SETTINGS: dict | None = None  # the variables below, read once; refresh() and use() re-read them


def _is_setting(name: str) -> bool:
    return name.startswith("FASTNLG_BACKEND") or name == "TRITON_INTERPRET"


def refresh() -> None:
    """Re-read FASTNLG_BACKEND, FASTNLG_BACKEND_<OP> and TRITON_INTERPRET from os.environ. The backend choice
    runs on every op call, a few times per layer, so it reads them once (a dict lookup per call); a program
    that changes them after fastnlg's first op call calls this, or sets them with `use`."""
    global _SETTINGS
    _SETTINGS = {k: v for k, v in os.environ.items() if _is_setting(k)}


def getenv(name: str) -> str | None:
    """The value of one of the backend variables as last read (refresh)."""
    if _SETTINGS is None:
        refresh()
    return _SETTINGS.get(name)


_UNCHANGED = object()


@contextlib.contextmanager
def use(backend: str | None | object = _UNCHANGED, op: str | None = None, interpret: bool | None = None):
    """Within the block, run `op` (every op when None) on `backend`, and/or run Triton kernels on CPU tensors
    under the interpreter (interpret=True) or not. It sets the environment variables, so subprocesses see
    them too, and restores them on exit; both ends re-read them. `backend=None` lifts an override.
    Kernels are compiled or interpreted as Triton decided when they were defined: `interpret` switches
    fastnlg's choice, and the interpreter itself must be set before the kernels are imported."""
    changes = {}
    if backend is not _UNCHANGED:
        var = f"FASTNLG_BACKEND_{op.upper()}" if op else "FASTNLG_BACKEND"
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"use(backend={backend!r}): not one of {', '.join(BACKENDS)}")
        changes[var] = backend
    if interpret is not None:
        changes["TRITON_INTERPRET"] = "1" if interpret else "0"
    saved = {name: os.environ.get(name) for name in changes}

    def apply(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh()

    apply(changes)
    try:
        yield
    finally:
        apply(saved)


def triton_interpret() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


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


@functools.lru_cache(maxsize=None)
def _variables(op: str | None) -> tuple[str, ...]:
    return ((f"FASTNLG_BACKEND_{op.upper()}",) if op else ()) + ("FASTNLG_BACKEND",)


def requested_backend(op: str | None = None) -> tuple[str | None, str]:
    """(backend asked for `op`, the variable that asked): FASTNLG_BACKEND_<OP> first, then FASTNLG_BACKEND."""
    for var in _variables(op):
        value = (getenv(var) or "").strip().lower()
        if value:
            if value not in BACKENDS:
                raise ValueError(f"{var}={value!r} is not one of {', '.join(BACKENDS)}")
            return value, var
    return None, "FASTNLG_BACKEND"


_WARNED: set = set()


def _warn_once(op: str, value: str, available: tuple[str, ...]) -> None:
    if (op, value) not in _WARNED:
        _WARNED.add((op, value))
        warnings.warn(f"FASTNLG_BACKEND={value!r} does not apply to {op} (it has: {', '.join(available)}); "
                      f"{op} keeps its default backend", stacklevel=3)


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


BF16_CAPABILITY = (8, 0)  # bf16 arithmetic: A100 / RTX 30 and newer; T4 and RTX 20 (7.5) have none


_CAPABILITY: dict = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, read once per device (a plain dict, which
    torch.compile traces through)."""
    cap = _CAPABILITY.get(device)
    if cap is None:
        cap = _CAPABILITY[device] = tuple(torch.cuda.get_device_capability(device))
    return cap


def check_bf16_supported(op: str, tensor: torch.Tensor) -> None:
    """bf16 tensors on a GPU without bf16 arithmetic (sm_75) are refused with one clear error: the kernels
    would compile to emulated, slow code there (and torch's own ops too); such GPUs train in fp16."""
    if tensor.dtype is torch.bfloat16 and tensor.device.type == "cuda":
        major, minor = device_capability(tensor.device)
        if (major, minor) < BF16_CAPABILITY:
            raise TypeError(f"{op}: bf16 tensors on {tensor.device} (compute capability {major}.{minor}): this GPU has "
                            "no bf16 arithmetic; use fp16 (fastnlg train --precision auto picks fp16 with a gradient "
                            "scaler there)")


def choose(op: str, tensor: torch.Tensor, available: tuple[str, ...], cpu_default_cpp: bool = True) -> str:
    """Backend for one call of `op` on `tensor`'s device; `available` lists what `op` implements.
    `cpu_default_cpp=False` keeps an op's C++ kernel opt-in (FASTNLG_BACKEND=cpp) where it measured
    slower than the torch reference on CPU. bf16 on a GPU without bf16 is an error (check_bf16_supported)."""
    device = tensor.device
    if device.type == "cuda":
        check_bf16_supported(op, tensor)
    requested, var = requested_backend(op)
    if requested is not None and requested not in available:
        if var != "FASTNLG_BACKEND":
            raise ValueError(f"{op}: {var}={requested!r} is not implemented for this op (it has: "
                             f"{', '.join(available)})")
        _warn_once(op, requested, available)
        requested = None
    if requested is not None:
        reason = _unusable_reason(requested, tensor)
        if reason:
            raise ValueError(f"{op}: {var}={requested!r} cannot run here: {reason}")
        return requested
    if device.type == "cuda":
        order = ("cuda", "triton", "torch")
    elif triton_interpret():
        order = ("triton", "cpp", "torch")
    else:  # (the usual CPU call, without the loop: C++ runs on any CPU tensor once it is built)
        return "cpp" if cpu_default_cpp and "cpp" in available and has_cpp() else "torch"
    for backend in order:
        if backend in available and _unusable_reason(backend, tensor) is None:
            return backend
    return "torch"
