"""Which implementation quantises / dequantises NF4 (fastnlg/backend.py decides): the torch reference here;
C++ (csrc/cpu/nf4.cpp) and Triton (kernels/nf4.py) are added next to it."""
from __future__ import annotations

import torch

from .. import backend as _backend
from . import nf4 as _ref

BACKENDS = ("torch",)


def quantize(W: torch.Tensor, blocksize: int):
    _backend.choose("quantize_nf4", W, BACKENDS)
    return _ref.quantize_nf4_reference(W, blocksize)


def dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    _backend.choose("dequantize_nf4", w.packed, BACKENDS)
    return _ref.dequantize_nf4_reference(w.packed, w.absmax_fp32(), w.shape, dtype, w.blocksize)
