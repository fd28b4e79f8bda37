"""nn.Module wrappers around fastnlg.ops, shaped like the Hugging Face modules they replace."""
from .norms import FastLayerNorm, FastRMSNorm
from .mlp import FastGatedMLP

__all__ = ["FastRMSNorm", "FastLayerNorm", "FastGatedMLP"]
