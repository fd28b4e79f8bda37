"""Which implementation quantises / dequantises NF4, one table per op (fastnlg/backend.py decides): CUDA
(csrc/cuda/nf4.cu, when fastnlg._C_cuda is built; dequantise and the batch-1 GEMV), Triton (kernels/nf4.py, CUDA
and the interpreter), C++ (csrc/cpu/nf4.cpp, the CPU default) or the torch spec (nf4_reference.py). All produce
the same bytes and the same dequantised values. `w` below is an NF4Weight (packed, absmax_fp32(), shape,
blocksize)."""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._native import ptr
from .nf4_reference import NF4_CODE, NF4_MIDPOINTS, dequantize_nf4_reference, on_device, quantize_nf4_reference

CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cuda/nf4_cuda.h


def _quantize_triton(W, blocksize):
    from fastnlg.kernels import nf4 as k

    return k.quantize(W, blocksize, on_device(NF4_MIDPOINTS, W.device))


def _quantize_cpp(W, blocksize):
    from fastnlg import _C

    x = W.reshape(-1).float().contiguous()
    packed = torch.empty(x.numel() // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-x.numel() // blocksize), dtype=torch.float32)
    _C.nf4_quantize(ptr(x), ptr(packed), ptr(absmax), x.numel(), blocksize)
    return packed, absmax


# (packed uint8 (n/2,), absmax fp32 (blocks,), shape, dtype, blocksize) -> W (shape, dtype)
def _dequantize_cuda(packed, absmax, shape, dtype, blocksize):
    from fastnlg import _C_cuda

    out = torch.empty(shape, dtype=dtype, device=packed.device)
    _C_cuda.nf4_dequantize(ptr(packed), ptr(absmax), ptr(out), CUDA_DTYPES[dtype], packed.numel(), blocksize,
                           torch.cuda.current_stream(packed.device).cuda_stream)
    return out


def _dequantize_triton(packed, absmax, shape, dtype, blocksize):
    from fastnlg.kernels import nf4 as k

    return k.dequantize(packed, absmax, on_device(NF4_CODE, packed.device), shape, dtype, blocksize)


def _dequantize_cpp(packed, absmax, shape, dtype, blocksize):
    from fastnlg import _C

    out = torch.empty(shape, dtype=torch.float32)
    _C.nf4_dequantize(ptr(packed), ptr(absmax), ptr(out), out.numel(), blocksize)
    return out if dtype == torch.float32 else out.to(dtype)


QUANTIZE = {"torch": quantize_nf4_reference, "cpp": _quantize_cpp, "triton": _quantize_triton}
DEQUANTIZE = {"torch": dequantize_nf4_reference, "cpp": _dequantize_cpp, "triton": _dequantize_triton,
              "cuda": _dequantize_cuda}
BACKENDS, DEQUANT_BACKENDS = tuple(QUANTIZE), tuple(DEQUANTIZE)


def quantize(W: torch.Tensor, blocksize: int):
    """W (contiguous) -> (packed, absmax fp32)."""
    return QUANTIZE[_backend.choose("quantize_nf4", W, BACKENDS)](W, blocksize)


def dequantize_raw(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int):
    """Packed bytes and their fp32 absmax (whole blocks, any device) -> a tensor of `shape` in `dtype`."""
    packed, absmax = packed.contiguous(), absmax.float().contiguous()
    return DEQUANTIZE[_backend.choose("dequantize_nf4", packed, DEQUANT_BACKENDS)](packed, absmax, shape, dtype,
                                                                                   blocksize)


def dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_raw(w.packed, w.absmax_fp32(), w.shape, dtype, w.blocksize)


def gemv(x: torch.Tensor, w) -> torch.Tensor:
    """y = x W^T for one token x (in,) against an NF4 weight (out, in): the CUDA kernel reads the packed
    weight once; elsewhere (or for in % 8 != 0) W is dequantised and multiplied."""
    out_f, in_f = w.shape
    if _backend.choose("nf4_gemv", x, ("cuda", "torch")) == "cuda" and in_f % 8 == 0:
        from fastnlg import _C_cuda

        xc, absmax = x.contiguous(), w.absmax_fp32().float().contiguous()
        y = torch.empty(out_f, dtype=x.dtype, device=x.device)
        _C_cuda.nf4_gemv(ptr(xc), ptr(w.packed), ptr(absmax), ptr(y), CUDA_DTYPES[x.dtype], out_f, in_f,
                         w.blocksize, torch.cuda.current_stream(x.device).cuda_stream)
        return y
    return torch.nn.functional.linear(x, dequantize(w, x.dtype))
