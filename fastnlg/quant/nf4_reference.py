"""The NF4 format in plain torch: its code tables and the reference (de)quantisation, the spec every backend
(quant/_backends.py) is tested against. NF4 (4-bit NormalFloat, QLoRA), laid out exactly as bitsandbytes lays it out.

For W with n elements, blocks of `blocksize` consecutive elements (row-major; the last block may be short):
    absmax_b = max |W_i| over block b                                   (fp32)
    q_i = the NF4 code whose value is nearest to W_i / absmax_b          (ties to the lower code: bitsandbytes
          compares against the 15 midpoints of NF4_CODE, x <= midpoint going left; full blocks scale by
          W_i * (1 / absmax_b), a short last block by W_i / absmax_b, both clamped to [-1, 1])
    packed byte j = q_{2j} << 4 | q_{2j+1}   (first element in the high nibble; an odd n pads one 0.0)
Double quantisation (bitsandbytes' compress_statistics=True) stores absmax in 8 bits:
    offset = mean(absmax);  a = absmax - offset in blocks of 256:
    absmax2_c = max |a| over block c,  qabsmax_i = nearest index into DYNAMIC_CODE of a_i / absmax2_c
    (the largest index whose code <= value, moved right only if the right neighbour is strictly nearer)
Dequantisation: W_i = NF4_CODE[q_i] * absmax_b in fp32, then cast; with double quantisation
absmax_b = DYNAMIC_CODE[qabsmax_b] * absmax2_c + offset.
"""
from __future__ import annotations

import torch

# The 16 NF4 levels (QLoRA, appendix E), as fp32 - the same values bitsandbytes uses.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
DOUBLE_QUANT_BLOCK = 256
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (7 exponent bits): 256 sorted fp32 values in [-0.993, 1]."""
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


def _blocks(flat: torch.Tensor, blocksize: int):
    """(full blocks (b, blocksize), remainder (r,))."""
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].reshape(-1, blocksize), flat[full:]


def quantize_nf4_reference(W: torch.Tensor, blocksize: int = 64):
    """-> (packed uint8 (n/2,), absmax fp32 (ceil(n/blocksize),)); the spec in plain torch."""
    flat = W.reshape(-1).float()
    body, rest = _blocks(flat, blocksize)
    absmax = body.abs().amax(-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if rest.numel():
        am = rest.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(rest / am, -1, 1)])
    q = torch.bucketize(scaled, NF4_MIDPOINTS.to(W.device)).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_8bit_reference(values: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCK):
    """bitsandbytes' blockwise 8-bit quantisation with the dynamic code -> (uint8 (n,), absmax2 fp32)."""
    body, rest = _blocks(values.float(), blocksize)
    parts, scales = [], []
    for chunk in ([body] if body.numel() else []) + ([rest[None]] if rest.numel() else []):
        am = chunk.abs().amax(-1)
        parts.append((chunk / am.clamp(min=1e-38)[:, None]).reshape(-1))  # an all-zero block codes to 0.0
        scales.append(am)
    normed, absmax2 = torch.cat(parts), torch.cat(scales)
    code = DYNAMIC_CODE.to(values.device)
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)
    right = (idx + 1).clamp(max=255)
    nearer = ((normed - code[right]).abs() < (normed - code[idx]).abs()) & (idx < 255)
    return (idx + nearer.long()).to(torch.uint8), absmax2


def dequantize_8bit_reference(q, absmax2, blocksize=DOUBLE_QUANT_BLOCK):
    vals = DYNAMIC_CODE.to(q.device)[q.long()]
    scale = absmax2.repeat_interleave(blocksize)[: vals.numel()]
    return vals * scale


def dequantize_nf4_reference(packed, absmax, shape, dtype, blocksize=64):
    n = 1
    for s in shape:
        n *= s
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:n]
    vals = NF4_CODE.to(packed.device)[q.long()]
    return (vals * absmax.repeat_interleave(blocksize)[:n]).reshape(shape).to(dtype)


_ON_DEVICE: dict = {}


def on_device(table: torch.Tensor, device) -> torch.Tensor:
    """`table` (NF4_CODE, NF4_MIDPOINTS, DYNAMIC_CODE) on `device`, copied there once per device."""
    key = (id(table), torch.device(device))
    t = _ON_DEVICE.get(key)
    if t is None:
        t = _ON_DEVICE[key] = table.to(key[1])
    return t
