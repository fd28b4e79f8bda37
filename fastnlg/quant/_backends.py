"""Which implementation quantises / dequantises NF4 (fastnlg/backend.py decides): CUDA (csrc/cuda/nf4.cu, when
fastnlg._C_cuda is built; dequantise and the batch-1 GEMV), Triton (kernels/nf4.py, CUDA and the interpreter),
C++ (csrc/cpu/nf4.cpp, the CPU default) or the torch reference (nf4.py). All produce the same bytes and the
same dequantised values."""
from __future__ import annotations

import torch

from .. import backend as _backend
from ..ops._native import ptr
from . import nf4 as _ref

BACKENDS = ("torch", "cpp", "triton")
DEQUANT_BACKENDS = BACKENDS + ("cuda",)
CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cuda/nf4_cuda.h


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
    backend = _backend.choose("dequantize_nf4", w.packed, DEQUANT_BACKENDS)
    absmax = w.absmax_fp32().float().contiguous()
    if backend == "cuda":
        from fastnlg import _C_cuda

        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        _C_cuda.nf4_dequantize(ptr(w.packed), ptr(absmax), ptr(out), CUDA_DTYPES[dtype], w.packed.numel(),
                               w.blocksize, torch.cuda.current_stream(w.device).cuda_stream)
        return out
    if backend == "triton":
        from fastnlg.kernels import nf4 as k

        return k.dequantize(w.packed.contiguous(), absmax, _ref.NF4_CODE.to(w.device), w.shape, dtype, w.blocksize)
    if backend == "cpp":
        from fastnlg import _C

        out = torch.empty(w.shape, dtype=torch.float32)
        _C.nf4_dequantize(ptr(w.packed.contiguous()), ptr(absmax), ptr(out), out.numel(), w.blocksize)
        return out if dtype == torch.float32 else out.to(dtype)
    return _ref.dequantize_nf4_reference(w.packed, absmax, w.shape, dtype, w.blocksize)


def gemv(x: torch.Tensor, w) -> torch.Tensor:
    """y = x W^T for one token x (in,) against an NF4 weight (out, in): the CUDA kernel reads the packed
    weight once; elsewhere (or for in % 8 != 0) W is dequantised and multiplied."""
    out_f, in_f = w.shape
    if _backend.choose("nf4_gemv", x, ("cuda", "torch")) == "cuda" and in_f % 8 == 0:
        from fastnlg import _C_cuda

        xc = x.contiguous()
        y = torch.empty(out_f, dtype=x.dtype, device=x.device)
        _C_cuda.nf4_gemv(ptr(xc), ptr(w.packed), ptr(w.absmax_fp32().float().contiguous()), ptr(y),
                         CUDA_DTYPES[x.dtype], out_f, in_f, w.blocksize, torch.cuda.current_stream(x.device).cuda_stream)
        return y
    return torch.nn.functional.linear(x, dequantize(w, x.dtype))
