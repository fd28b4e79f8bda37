"""Other implementations of our ops. Each returns {name: fn(**inputs)} with the benchmark's argument names;
a peer that is not installed (or, Triton-based, has no CUDA device) is still listed, as a function raising
`NotInstalled`, so the report shows it as "not installed" instead of silently dropping it."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


class NotInstalled(Exception):
    """This peer cannot run here (the message says why); the report says so instead of a time."""


def missing(why: str):
    def run(**_):
        raise NotInstalled(why)
    return run


def available(module: str, needs_cuda: bool = True) -> str | None:
    """None when the peer can run here, else why not."""
    if not _installed(module):
        return f"not installed ({module})"
    if needs_cuda and not torch.cuda.is_available():
        return "not run: needs CUDA"
    return None


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
    why = available("liger_kernel")
    if why is None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    else:
        peers["liger"] = missing(why)
    why = available("cut_cross_entropy")
    if why is None:
        from cut_cross_entropy import linear_cross_entropy

        peers["cut-cross-entropy"] = lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels)
    else:
        peers["cut-cross-entropy"] = missing(why)
    return peers


def cross_entropy_peers() -> dict:
    """fn(logits, labels) -> mean loss."""
    peers = {}
    why = available("liger_kernel")
    if why is None:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        peers["liger"] = lambda logits, labels: liger(logits, labels)
    else:
        peers["liger"] = missing(why)
    return peers


def fused_linear_logprobs_peers() -> dict:
    """fn(hidden, weight, labels) -> per-token log-probabilities (N,): TRL's own chunked log-prob kernel (the
    fused head of its DPO/GRPO/KTO trainers; torch tiles on CPU, Triton on CUDA)."""
    why = None if _installed("trl.kernels") else "not installed (trl)"
    if why is not None:
        return {"trl.chunked_logprob": missing(why)}

    def trl_chunked(hidden, weight, labels):
        from trl.kernels import ChunkedLogProbFunction

        return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("log_probs",))[0]
    return {"trl.chunked_logprob": trl_chunked}
