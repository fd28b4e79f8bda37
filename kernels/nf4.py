"""NF4 quantise / dequantise on the GPU (the format and its rounding: fastnlg/quant/nf4_reference.py).

quantise: one program per NF4 block of BS elements (a power of 2, <= 4096), read as BS/2 (even, odd) pairs:
    absmax = max |x|;  s = clamp(x * (1 / absmax), -1, 1)  (a short last block: x / absmax), IEEE-rounded
    (div_rn: Triton's default fp32 division is approximate, which would break byte equality);
    q = #{k : MID[k] < s};  byte = q_even << 4 | q_odd
dequantise: one program per BLOCK bytes: x_even = CODE[byte >> 4] * absmax, x_odd = CODE[byte & 15] * absmax,
    with absmax = absmax[element // BS] (fp32 math, then the output dtype).
"""
import torch
import triton
import triton.language as tl

from ._launch import AOT_DTYPES, TRITON_DTYPE

DEQUANT_BLOCK = 1024  # bytes per program
BLOCKSIZES = tuple(2**i for i in range(6, 13))  # 64 .. 4096, the NF4 blocksizes (nf4_reference.BLOCKSIZES)


@triton.jit
def nf4_quantize_kernel(X, PACKED, ABSMAX, MID, n, BS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BS // 2)
    i0 = b * BS + 2 * pairs
    ok = i0 < n
    x0 = tl.load(X + i0, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(X + i0 + 1, mask=ok, other=0.0).to(tl.float32)
    am = tl.maximum(tl.max(tl.abs(x0), axis=0), tl.max(tl.abs(x1), axis=0))
    tl.store(ABSMAX + b, am)
    safe = tl.maximum(am, 1e-38).to(tl.float32)
    short = b * BS + BS > n
    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), safe)
    s0 = tl.where(short, tl.math.div_rn(x0, safe), x0 * inv)
    s1 = tl.where(short, tl.math.div_rn(x1, safe), x1 * inv)
    s0 = tl.minimum(tl.maximum(s0, -1.0), 1.0)
    s1 = tl.minimum(tl.maximum(s1, -1.0), 1.0)
    q0 = tl.zeros([BS // 2], dtype=tl.int32)
    q1 = tl.zeros([BS // 2], dtype=tl.int32)
    for k in tl.static_range(15):
        m = tl.load(MID + k)
        q0 += (m < s0).to(tl.int32)
        q1 += (m < s1).to(tl.int32)
    tl.store(PACKED + b * (BS // 2) + pairs, ((q0 << 4) | q1).to(tl.uint8), mask=ok)


@triton.jit
def nf4_dequantize_kernel(PACKED, ABSMAX, CODE, OUT, n_bytes, BS: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = j < n_bytes
    byte = tl.load(PACKED + j, mask=ok, other=0).to(tl.int32)
    scale = tl.load(ABSMAX + (2 * j) // BS, mask=ok, other=0.0)
    hi = tl.load(CODE + (byte >> 4)) * scale
    lo = tl.load(CODE + (byte & 15)) * scale
    tl.store(OUT + 2 * j, hi.to(OUT.dtype.element_ty), mask=ok)
    tl.store(OUT + 2 * j + 1, lo.to(OUT.dtype.element_ty), mask=ok)


def quantize(W: torch.Tensor, blocksize: int, mid: torch.Tensor):
    """W contiguous fp16/bf16/fp32, numel even -> (packed uint8 (n/2,), absmax fp32 (blocks,))."""
    n = W.numel()
    blocks = triton.cdiv(n, blocksize)
    packed = torch.empty(n // 2, dtype=torch.uint8, device=W.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=W.device)
    nf4_quantize_kernel[(blocks,)](W, packed, absmax, mid, n, BS=blocksize, num_warps=4 if blocksize <= 1024 else 8)
    return packed, absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, dtype, blocksize: int):
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    nb = packed.numel()
    nf4_dequantize_kernel[(triton.cdiv(nb, DEQUANT_BLOCK),)](packed, absmax, code, out, nb, BS=blocksize,
                                                             BLOCK=DEQUANT_BLOCK, num_warps=4)
    return out


def _specs():
    specs = []
    for dtype in AOT_DTYPES + (torch.float16,):
        t = "*" + TRITON_DTYPE[dtype]
        for bs in BLOCKSIZES:
            specs.append({"kernel": nf4_quantize_kernel, "num_warps": 4 if bs <= 1024 else 8,
                          "signature": {"X": t, "PACKED": "*u8", "ABSMAX": "*fp32", "MID": "*fp32", "n": "i64",
                                        "BS": "constexpr"}, "constexprs": {"BS": bs}})
        specs.append({"kernel": nf4_dequantize_kernel, "num_warps": 4,
                      "signature": {"PACKED": "*u8", "ABSMAX": "*fp32", "CODE": "*fp32", "OUT": t, "n_bytes": "i64",
                                    "BS": "constexpr", "BLOCK": "constexpr"},
                      "constexprs": {"BS": 64, "BLOCK": DEQUANT_BLOCK}})
    return specs


AOT_SPECS = _specs()
