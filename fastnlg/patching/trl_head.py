"""TRL's fused LM head on fastnlg.ops.fused_linear_logprobs. TRL (1.16) gives its DPO, KTO, GRPO, RLOO and SFT
trainers' models a fused head (trl.trainer.utils.add_fused_lm_head: `model(..., labels, fused_lm_head=True)`
returns per-token log-probabilities without the logits); the head calls trl.trainer.utils._ChunkedLogProbFunction
.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs) ->
(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1). While a patched model is alive that name is
FastnlgChunkedLogProb below (swaps.py: reference counted): the same call and outputs on fastnlg's kernels (on CPU
the C++ rows; with a frozen head, the gradient to the hidden states kept from the forward pass). A call it does
not take (a softcapped head: Gemma 2) runs TRL's own function, with one warning.

This is the point of TRL that its trainers share; the name is TRL's, not public API: `available()` checks that it
is there with the signature above, and fastnlg.patch reports the swap, or why it did not make it. The swap is tried
when TRL has been imported (`import trl` before fastnlg.patch); a model patched before that keeps TRL's kernel
under TRL's trainers (nothing of TRL runs at patch time then, so nothing is reported)."""
from __future__ import annotations

import importlib
import inspect
import warnings

from . import swaps

MODULE, ATTR = "trl.trainer.utils", "_ChunkedLogProbFunction"
PARAMS = ["hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
          "logit_scale", "outputs"]
_WARNED: set = set()


def available() -> str | None:
    """None when TRL's fused head can run on fastnlg's op, else why not."""
    try:  # (called once `import trl` has run: TRL imports its trainer modules lazily, this one now)
        module = importlib.import_module(MODULE)
    except Exception as exc:  # noqa: BLE001  (a TRL that cannot import it: its own code runs, as said)
        return f"{MODULE} does not import here ({type(exc).__name__}: {exc}): TRL's fused head runs TRL's own code"
    fn = getattr(module, ATTR, None)
    if fn is None:
        return f"this TRL has no {MODULE}.{ATTR}: its fused head (if any) runs TRL's own code"
    if getattr(fn, "__fastnlg_original__", None) is not None:
        return None
    try:
        params = list(inspect.signature(fn.forward).parameters)[1:]  # (after ctx)
    except (AttributeError, TypeError, ValueError):
        params = None
    if params != PARAMS:
        return f"{MODULE}.{ATTR} takes {params}, not the {PARAMS} fastnlg knows: TRL's own kernel runs"
    return None


def make(original):
    from ..ops import fused_linear_logprobs

    class FastnlgChunkedLogProb:
        """TRL's _ChunkedLogProbFunction's apply on fastnlg.ops.fused_linear_logprobs."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                  logit_scale=1.0, outputs=("log_probs",)):
            if final_logit_softcapping is not None or not logit_scale > 0:
                why = "a softcapped head" if final_logit_softcapping is not None else f"logit_scale={logit_scale}"
                if why not in _WARNED:
                    _WARNED.add(why)
                    warnings.warn(f"fastnlg: TRL's fused head with {why} runs TRL's own kernel (fastnlg's "
                                  "fused_linear_logprobs has no softcap)", stacklevel=2)
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            if weight.dtype != hidden.dtype:  # (TRL computes in the hidden states' dtype)
                weight = weight.to(hidden.dtype)
                bias = None if bias is None else bias.to(hidden.dtype)
            logp, ent, mean, lsq, top1 = fused_linear_logprobs(hidden, weight, targets, bias=bias,
                                                               temperature=temperature / logit_scale,
                                                               return_stats=True)
            return (logp, ent if "entropy" in outputs else None, lsq if "log_sum_sq_probs" in outputs else None,
                    mean if "mean_logits" in outputs else None, top1 if "is_top1" in outputs else None)

    return FastnlgChunkedLogProb


def hold(state) -> None:
    swaps.hold(MODULE, ATTR, make, state)


def release(state) -> None:
    swaps.release(MODULE, ATTR, state)
