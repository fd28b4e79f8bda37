"""NF4 (4-bit NormalFloat, QLoRA) weights laid out exactly as bitsandbytes lays them out.

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

from ..ops._checks import check_tensor

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


def _check_weight(op, W, blocksize):
    check_tensor(op, "W", W, dtypes=DTYPES)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if W.numel() == 0:
        raise ValueError(f"{op}: W is empty (shape {tuple(W.shape)})")
    if W.numel() % 2:
        raise ValueError(f"{op}: W has {W.numel()} elements (shape {tuple(W.shape)}); NF4 packs two per byte, "
                         "so the size must be a multiple of 2")
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite.reshape(-1))[0, 0].item()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), W.shape))
        raise ValueError(f"{op}: W has NaN/Inf (first at index {index}: {W.reshape(-1)[bad].item()}); "
                         "quantising it would hide the problem")


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


BNB_CPU_BLOCK_N = 32  # output rows per tile in bitsandbytes' AVX512-BF16 CPU layout


def _from_bnb_cpu_layout(data, state):
    """What a Params4bit holds after bitsandbytes' `_convert_weight_packed_for_cpu` -> NF4Weight arguments.

    On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place on its first forward in eval
    mode without grad. Its data becomes (N, K/2) uint8, read as tiles of 32 bytes (the (N/32 * K/2, 32) view):
        tile (n // 32, k) holds the 64 nibbles of rows n // 32 * 32 ... + 31, columns 2k and 2k + 1;
        lane (n % 32) * 2 + j of the tile is element (n, 2k + j);
        byte i of the tile = lane (32 + i) << 4 | lane i,
    and absmax is decoded from the double quantisation, rounded to bf16 and stored as (K / blocksize, N).
    From then on bitsandbytes computes with W = NF4_CODE[q] * bf16(absmax); this returns exactly that weight
    in the standard layout (a copy: packed bytes high nibble first, absmax in fp32, no double quantisation),
    never the repacked bytes read as standard NF4."""
    N, K = (int(s) for s in state.shape)
    bs = state.blocksize
    absmax = state.absmax
    if (data.dtype != torch.uint8 or tuple(data.shape) != (N, K // 2) or N % BNB_CPU_BLOCK_N or K % bs
            or tuple(absmax.shape) != (K // bs, N)):
        raise ValueError(
            f"NF4Weight.from_bnb: the Params4bit is in bitsandbytes' CPU-packed layout (packing_format_for_cpu) "
            f"but its tensors are not what that layout holds for shape {(N, K)}, blocksize {bs}: data "
            f"{tuple(data.shape)} {data.dtype}, absmax {tuple(absmax.shape)}; refusing to guess")
    tiles = data.reshape(-1, BNB_CPU_BLOCK_N)  # (N/32 * K/2, 32)
    lanes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # (N/32 * K/2, 64)
    q = lanes.reshape(N // BNB_CPU_BLOCK_N, K // 2, BNB_CPU_BLOCK_N, 2).transpose(1, 2).reshape(-1)  # (N*K,)
    packed = (q[0::2] << 4) | q[1::2]
    dtype = getattr(state, "original_dtype", state.dtype)
    return packed.contiguous(), absmax.t().reshape(-1).float(), (N, K), dtype, bs


class NF4Weight:
    """A weight in NF4. packed (n/2,) uint8; absmax fp32 (blocks,) or, double-quantised, uint8 (blocks,)
    with offset (fp32 scalar tensor) and absmax2 fp32 (ceil(blocks / 256),); shape/dtype of the original."""

    def __init__(self, packed, absmax, shape, dtype, blocksize=64, offset=None, absmax2=None):
        self.packed, self.absmax, self.shape, self.dtype = packed, absmax, torch.Size(shape), dtype
        self.blocksize, self.offset, self.absmax2 = blocksize, offset, absmax2

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self):
        return self.packed.device

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax in fp32 (undoing the double quantisation)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_8bit_reference(self.absmax, self.absmax2) + self.offset

    def dequantize(self, dtype=None) -> torch.Tensor:
        from . import _backends

        return _backends.dequantize(self, dtype or self.dtype)

    def to(self, device) -> "NF4Weight":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         move(self.offset), move(self.absmax2))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.offset, self.absmax2)
                   if t is not None)

    # -- bitsandbytes interop: the same tensors, shared or copied, never re-quantised --
    @classmethod
    def from_bnb(cls, param) -> "NF4Weight":
        """From a quantised `bitsandbytes.nn.Params4bit` (NF4, uint8 or any quant_storage)."""
        state = getattr(param, "quant_state", None)
        if state is None:
            raise ValueError("NF4Weight.from_bnb: the Params4bit is not quantised yet (no quant_state); move it "
                             "to its device first")
        if state.quant_type != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: quant_type {state.quant_type!r} is not 'nf4'")
        if getattr(state, "packing_format_for_cpu", False):
            return cls(*_from_bnb_cpu_layout(param.data, state))
        packed = param.data.reshape(-1).view(torch.uint8) if param.data.dtype != torch.uint8 else param.data.reshape(-1)
        if state.nested:
            s2 = state.state2
            if s2.blocksize != DOUBLE_QUANT_BLOCK or not torch.equal(s2.code.cpu(), DYNAMIC_CODE):
                raise ValueError("NF4Weight.from_bnb: nested statistics use a code or blocksize other than "
                                 "bitsandbytes' dynamic map in blocks of 256")
            return cls(packed, state.absmax, state.shape, state.dtype, state.blocksize,
                       state.offset.reshape(()).float(), s2.absmax)
        return cls(packed, state.absmax, state.shape, state.dtype, state.blocksize)

    def to_bnb(self):
        """A `bitsandbytes.nn.Params4bit` holding these tensors (bitsandbytes dequantises it identically)."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=DYNAMIC_CODE.to(self.device), blocksize=DOUBLE_QUANT_BLOCK,
                                dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=NF4_CODE.to(self.device),
                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype, offset=self.offset,
                           state2=state2)
        return bnb.nn.Params4bit(self.packed.reshape(-1, 1), requires_grad=False, quant_state=state,
                                 blocksize=self.blocksize, compress_statistics=self.double_quant, quant_type="nf4",
                                 bnb_quantized=True)

    # -- safetensors --
    def state_dict(self) -> dict:
        tensors = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            tensors.update(offset=self.offset.reshape(1), absmax2=self.absmax2)
        return tensors

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        meta = {"format": "fastnlg-nf4", "shape": ",".join(map(str, self.shape)),
                "dtype": str(self.dtype).replace("torch.", ""), "blocksize": str(self.blocksize)}
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device="cpu") -> "NF4Weight":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "fastnlg-nf4":
                raise ValueError(f"NF4Weight.load: {path} is not a fastnlg NF4 file (metadata format="
                                 f"{meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        shape = tuple(int(s) for s in meta["shape"].split(",") if s)
        dtype = getattr(torch, meta["dtype"])
        offset = t["offset"].reshape(()) if "offset" in t else None
        return cls(t["packed"], t["absmax"], shape, dtype, int(meta["blocksize"]), offset, t.get("absmax2"))

    def __repr__(self):
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """W (any shape, fp16/bf16/fp32, size a multiple of 2, finite) -> NF4Weight."""
    from . import _backends

    _check_weight("quantize_nf4", W, blocksize)
    packed, absmax = _backends.quantize(W.contiguous(), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, W.shape, W.dtype, blocksize)
    offset = absmax.mean()
    qabsmax, absmax2 = quantize_8bit_reference(absmax - offset)
    return NF4Weight(packed, qabsmax, W.shape, W.dtype, blocksize, offset, absmax2)
