"""fastnlg: fused kernels for fine-tuning language models for text generation on one GPU.

    import fastnlg
    y = fastnlg.ops.rms_norm(x, weight)          # Triton on CUDA, C++ / torch on CPU (fastnlg.backend)
    report = fastnlg.patch(model)                # fused kernels into a Transformers / PEFT model
    fastnlg.is_patched(model)                    # True until fastnlg.unpatch(model)
    fastnlg.unpatch(model)
    model, report = fastnlg.from_pretrained(path, load_in_4bit=True, lora={"r": 16, ...})   # loaded, patched
"""
from . import _quiet

_quiet.install()  # before bitsandbytes is imported (fastnlg/_quiet.py)

from . import backend, losses, ops  # noqa: E402, F401
from .loading import from_pretrained  # noqa: E402, F401
from .patching import PatchReport, is_patched, patch, unpatch  # noqa: E402, F401

__version__ = "0.1.0"
