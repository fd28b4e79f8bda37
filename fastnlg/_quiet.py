"""Third-party messages that fastnlg's own import paths or calls cause, and that a user cannot act on as worded.
They are replaced, once, by what they mean.

- bitsandbytes, on CPUs with AVX512-BF16, logs "Failed to load CPU gemm_4bit_forward from kernels-community"
  when Hugging Face's optional `kernels` package is not installed. Its slower CPU path runs instead, and
  fastnlg's own NF4 kernels do not use it at all.
- PEFT's model wrapper calls Transformers' deprecated `is_gradient_checkpointing`, which warns with a
  FutureWarning on every call (`peft_calls`, around fastnlg's calls into PEFT).
"""
from __future__ import annotations

import contextlib
import logging
import warnings

_said: set = set()


class _BitsandbytesKernels(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "gemm_4bit_forward from kernels-community" not in record.getMessage():
            return True
        if "bnb" not in _said:
            _said.add("bnb")
            logging.getLogger("fastnlg").warning(
                "bitsandbytes' optional fast CPU 4-bit kernel needs Hugging Face's `kernels` package (pip install "
                "kernels), which is not installed: bitsandbytes uses its slower CPU path; fastnlg's own NF4 kernels "
                "do not depend on it")
        return False


def install() -> None:
    """The logging filters above (before bitsandbytes is imported; idempotent)."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _BitsandbytesKernels) for f in log.filters):
        log.addFilter(_BitsandbytesKernels())


@contextlib.contextmanager
def peft_calls():
    """Around fastnlg's calls into PEFT: its own deprecated call into Transformers stays quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield
