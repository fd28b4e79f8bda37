"""Which implementation quantises / dequantises NF4 (fastnlg/backend.py decides): Triton (kernels/nf4.py,
CUDA and the interpreter), C++ (csrc/cpu/nf4.cpp, the CPU default) or the torch reference (nf4.py). All three
produce the same bytes and the same dequantised values."""
from __future__ import annotations

import torch

from .. import backend as _backend
from ..ops._dispatch import ptr
from . import nf4 as _ref

BACKENDS = ("torch", "cpp", "triton")


def quantize(W: torch.Tensor, blocksize: int):
    backend = _backend.choose("quantize_nf4", W, BACKENDS)
    if backend == "triton":
        from fastnlg.kernels import nf4 as k

        return k.quantize(W, blocksize, _ref.NF4_MIDPOINTS.to(W.device))
    if backend == "cpp":
        from fastnlg import _C

        x = W.reshape(-1).float().contiguous()
        packed = torch.empty(x.numel() // 2, dtype=torch.uint8)
        absmax = torch.empty(-(-x.numel() // blocksize), dtype=torch.float32)
        _C.nf4_quantize(ptr(x), ptr(packed), ptr(absmax), x.numel(), blocksize)
        return packed, absmax
    return _ref.quantize_nf4_reference(W, blocksize)


def dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    backend = _backend.choose("dequantize_nf4", w.packed, BACKENDS)
    absmax = w.absmax_fp32().float().contiguous()
    if backend == "triton":
        from fastnlg.kernels import nf4 as k

        return k.dequantize(w.packed.contiguous(), absmax, _ref.NF4_CODE.to(w.device), w.shape, dtype, w.blocksize)
    if backend == "cpp":
        from fastnlg import _C

        out = torch.empty(w.shape, dtype=torch.float32)
        _C.nf4_dequantize(ptr(w.packed.contiguous()), ptr(absmax), ptr(out), out.numel(), w.blocksize)
        return out if dtype == torch.float32 else out.to(dtype)
    return _ref.dequantize_nf4_reference(w.packed, absmax, w.shape, dtype, w.blocksize)
