"""Which host synchronisations a training step makes, by the fastnlg function that makes them.

torch.cuda.set_sync_debug_mode("warn") makes every synchronising CUDA call warn; `record()` catches those
warnings while they are raised, with the Python stack of the call, and counts them per innermost fastnlg
function (`site`). ALLOWED names the reads a patched step may make, and why; any other is a defect (DESIGN.md
§4.10: no host syncs in a training step's hot path). tests/train/test_trainer_gpu.py checks it, and the GPU
smoke run (benchmarks/smoke_checks.py) records what it saw."""
from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from collections import Counter

import torch

PACKAGE = os.path.dirname(os.path.abspath(__import__("fastnlg").__file__))
ALLOWED = {
    "fastnlg/ops/token_loss.py:valid_rows": "the loss's count of non-ignored rows and its label-range check: "
                                              "one read of three numbers per loss call",
    "fastnlg/ops/fused_linear_cross_entropy.py:forward": "the indices of the non-ignored rows, where dropping them "
                                                         "saves work (a data-dependent size)",
    "fastnlg/nn/hf_attention.py:_as_kernel_mask": "a 4-D attention mask's (causal, key padding) form: once per "
                                                  "mask tensor, which every layer shares",
    "fastnlg/nn/hf_attention.py:_packed_cu_seqlens": "packed samples' boundaries read from position_ids: once per "
                                                     "mask tensor",
    "fastnlg/nn/encoder.py:masked_lm_forward": "the masked rows' indices (a data-dependent size): the MLM head's "
                                               "transform and the loss run on those rows only",
    "fastnlg/ops/attention.py:_check": "cu_seqlens' values, when the caller gives no max_seqlen",
}


def site(stack) -> str:
    """"fastnlg/<file>:<function>" of the innermost fastnlg frame of `stack`, else the innermost frame."""
    for frame in reversed(stack):
        path = os.path.abspath(frame.filename)
        if path.startswith(PACKAGE + os.sep):
            return f"fastnlg/{os.path.relpath(path, PACKAGE)}:{frame.name}"
    frame = stack[-1]
    return f"{frame.filename}:{frame.name}"


@contextlib.contextmanager
def record(set_mode: bool = True):
    """Yields a Counter {site: synchronising calls}, filled while the block runs (CUDA only). set_mode=False
    leaves the sync debug mode to the code inside (the trainer's sync_debug with SYNC_DEBUG_MODE "warn")."""
    seen: Counter = Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" in str(message):
                seen[site(traceback.extract_stack()[:-1])] += 1
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = hook
        if set_mode:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def unexpected(seen: Counter) -> dict:
    return {s: n for s, n in seen.items() if s not in ALLOWED}
