"""Input checks shared by the ops: run once in Python, with messages that name the argument and the
shapes/dtypes/devices seen (DESIGN.md §4.5), so native code never sees bad input."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DtypeError(TypeError, ValueError):
    """An unsupported dtype: a TypeError, and a ValueError for callers that catch bad values."""


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, ndim: int | None = None, min_ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise DtypeError(f"{op}: {name} has dtype {t.dtype}, expected one of {names}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {seen}")


def check_same_dtype(op: str, **tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    if len({v.dtype for v in present.values()}) > 1:
        seen = ", ".join(f"{k}={v.dtype}" for k, v in present.items())
        raise TypeError(f"{op}: dtypes must match, got {seen}")


def check_same_shape(op: str, **tensors):
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        seen = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{op}: shapes must match, got {seen}")


def check_last_dim(op: str, name: str, t: torch.Tensor, size: int, other: str):
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{op}: {name} must have shape ({size},) to match the last dim of {other}, got {tuple(t.shape)}")
