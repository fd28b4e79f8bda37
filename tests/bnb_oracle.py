"""bitsandbytes as a test reference only where it is right on the machine at hand.

The compatibility promise is bitsandbytes' NF4 *format* (packed bytes, absmax, double-quant statistics) and
the *definition* of dequantisation:
    W = NF4_CODE[nibble] * absmax                  absmax = DYNAMIC_CODE[q] * absmax2[block // 256] + offset
                                                   when double-quantised
Its CPU kernels are not that definition everywhere: bitsandbytes 0.50's `dequantize_4bit` on AVX-512 CPUs
(seen on AMD EPYC with AVX512-BF16 and on Intel Xeon with AVX512-FP16/AMX) is wrong whenever a
quantisation block spans two rows (a row length that is not a multiple of the blocksize, e.g. (64, 96) at
blocksize 64: off by up to 0.04), while it is right on other CPUs. So the tests compare with the definition,
written here from the format alone (not fastnlg's code), on every machine, and with bitsandbytes' own
dequantisation only after `bnb_dequantize_is_exact` has checked it on the same configuration.

`dequantize_by_definition()` replaces bitsandbytes' CPU dequantisation kernels by the definition for a block
of code (a PEFT + bitsandbytes model then computes what bitsandbytes is meant to compute), and
`broken_bnb_dequantize()` makes them wrong on purpose: the tests show with it that no verdict depends on
bitsandbytes being right. `FASTNLG_TEST_BREAK_BNB=1` does that for a whole pytest run (tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch

_generation = [0]  # bumped whenever the kernels are swapped, so cached self-checks are redone


def nf4_code() -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.get_4bit_type("nf4", device="cpu").float()


def dynamic_code() -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.create_dynamic_map(signed=True).float()


def definition_blockwise(A, absmax, code, blocksize, dtype):
    """8-bit blockwise dequantisation by definition: code[A] * absmax[block] -> dtype."""
    vals = code.float().cpu()[A.reshape(-1).long().cpu()]
    return (vals * absmax.float().cpu().repeat_interleave(blocksize)[: vals.numel()]).reshape(A.shape).to(dtype)


def definition_dequantize(A, absmax, blocksize, shape, dtype):
    """NF4 dequantisation by definition: packed bytes (high nibble first) and fp32 absmax -> `shape`, `dtype`."""
    p = A.reshape(-1).view(torch.uint8).cpu()
    n = math.prod(shape)
    q = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)[:n].long()
    vals = nf4_code()[q] * absmax.float().cpu().repeat_interleave(blocksize)[:n]
    return vals.reshape(tuple(shape)).to(dtype)


def state_absmax(state) -> torch.Tensor:
    """A QuantState's per-block absmax in fp32, decoding the double quantisation by definition."""
    if not state.nested:
        return state.absmax.float()
    return definition_blockwise(state.absmax, state.state2.absmax, dynamic_code(), state.state2.blocksize,
                                torch.float32) + state.offset.float()


def definition_dequantize_state(packed, state):
    return definition_dequantize(packed, state_absmax(state), state.blocksize, state.shape, state.dtype)


@functools.lru_cache(maxsize=None)
def _self_check(shape, blocksize, dtype, nested, generation) -> str:
    import bitsandbytes.functional as bf

    g = torch.Generator().manual_seed(1234)
    W = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    packed, state = bf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    theirs = bf.dequantize_4bit(packed, state)
    expected = definition_dequantize_state(packed, state)
    if torch.equal(theirs, expected):
        return ""
    err = (theirs.float() - expected.float()).abs().max().item()
    return (f"bitsandbytes' CPU dequantize_4bit is wrong on this CPU for shape {tuple(shape)}, blocksize "
            f"{blocksize}, {dtype}{', double-quantised' if nested else ''} (off the definition "
            f"code[nibble] * absmax by up to {err:.3g}); the test compares with the definition instead")


def bnb_dequantize_is_exact(shape, blocksize, dtype=torch.float32, nested=False) -> tuple[bool, str]:
    """(True, "") when bitsandbytes' CPU dequantisation equals the definition bit for bit on random data of
    this configuration; else (False, reason)."""
    why = _self_check(tuple(shape), blocksize, dtype, nested, _generation[0])
    return not why, why


@contextlib.contextmanager
def _cpu_kernels(dequantize_4bit, dequantize_blockwise):
    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        lib.impl("dequantize_4bit", lambda A, absmax, blocksize, quant_type, shape, dtype:
                 dequantize_4bit(A, absmax, blocksize, shape, dtype), "CPU")
        lib.impl("dequantize_blockwise", dequantize_blockwise, "CPU")
    _generation[0] += 1
    try:
        yield
    finally:
        lib._destroy()  # the dispatcher falls back to bitsandbytes' own kernels
        _generation[0] += 1


def dequantize_by_definition():
    """bitsandbytes' CPU dequantisation kernels replaced by the definition while the block runs."""
    return _cpu_kernels(definition_dequantize, definition_blockwise)


def _broken_dequantize(A, absmax, blocksize, shape, dtype):
    W = definition_dequantize(A, absmax, blocksize, shape, torch.float32)
    return W.reshape(-1).mul(torch.linspace(0.9, 1.1, W.numel())).reshape(W.shape).to(dtype)


def broken_bnb_dequantize():
    """bitsandbytes' CPU NF4 dequantisation made wrong on purpose (every element off by up to 10%)."""
    return _cpu_kernels(_broken_dequantize, definition_blockwise)
