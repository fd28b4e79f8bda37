"""4-bit NormalFloat (NF4) weights, byte-compatible with bitsandbytes (DESIGN.md §3)."""
from .nf4 import NF4Weight, dequantize_nf4_reference, quantize_nf4, quantize_nf4_reference

__all__ = ["NF4Weight", "quantize_nf4", "quantize_nf4_reference", "dequantize_nf4_reference"]
