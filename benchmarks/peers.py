"""Other implementations of our ops, added to a benchmark only when they are installed (and, for the
Triton-based ones, only on CUDA). Each returns {name: fn(**inputs)} with the benchmark's argument names."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def fused_linear_cross_entropy_peers() -> dict:
    """fn(hidden, weight, labels) -> mean loss."""
    peers = {}
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13
        options = torch.nn.LinearCrossEntropyOptions()

        def torch_chunked(hidden, weight, labels):
            return F.linear_cross_entropy(hidden, weight, labels, options=options)
        peers["torch.linear_cross_entropy"] = torch_chunked
    if torch.cuda.is_available() and _installed("liger_kernel"):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    if torch.cuda.is_available() and _installed("cut_cross_entropy"):
        from cut_cross_entropy import linear_cross_entropy

        peers["cut-cross-entropy"] = lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels)
    return peers


def cross_entropy_peers() -> dict:
    """fn(logits, labels) -> mean loss."""
    peers = {}
    if torch.cuda.is_available() and _installed("liger_kernel"):
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        peers["liger"] = lambda logits, labels: liger(logits, labels)
    return peers
