"""fastnlg: fused kernels for fine-tuning language models for text generation on one GPU.

    import fastnlg
    y = fastnlg.ops.rms_norm(x, weight)          # Triton on CUDA, C++ / torch on CPU (fastnlg.backend)
"""
from . import backend, ops  # noqa: F401

__version__ = "0.1.0"
