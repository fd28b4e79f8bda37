"""NF4Weight: a weight in NF4 (the format and its spec: nf4_reference.py), bitsandbytes interop, safetensors files."""
from __future__ import annotations

import torch

from .._checks import check_tensor
from . import _backends
from .nf4_reference import (  # noqa: F401  (the format's names, also importable from here)
    BLOCKSIZES,
    DOUBLE_QUANT_BLOCK,
    DTYPES,
    DYNAMIC_CODE,
    NF4_CODE,
    NF4_MIDPOINTS,
    dequantize_8bit_reference,
    dequantize_nf4_reference,
    dynamic_code,
    quantize_8bit_reference,
    quantize_nf4_reference,
)


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
    _check_weight("quantize_nf4", W, blocksize)
    packed, absmax = _backends.quantize(W.contiguous(), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, W.shape, W.dtype, blocksize)
    offset = absmax.mean()
    qabsmax, absmax2 = quantize_8bit_reference(absmax - offset)
    return NF4Weight(packed, qabsmax, W.shape, W.dtype, blocksize, offset, absmax2)
