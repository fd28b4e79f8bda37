"""Preference and RL losses on log-probabilities, with TRL's names, arguments and semantics (TRL 1.16: DPOTrainer,
CPOTrainer, ORPOTrainer, KTOTrainer, GRPOTrainer; tests/test_losses.py runs TRL's own code beside each).

They take sequence log-probabilities (or, for GRPO, per-token ones), which `fastnlg.ops.fused_linear_logprobs`
computes without the (N, V) logits, and `sequence_logps` sums (or averages) over each completion. Everything
here is a few ops on (B,) or (B, T) tensors: the logits, where the memory goes, never reach this module.

Sequence losses return per-example losses (B,) and the rewards TRL logs (detached); the trainer's loss is
their mean, or, for gradient accumulation that equals one large batch, `reduce(losses, num_items_in_batch)`
with the number of examples in the whole accumulated batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check(op, **tensors):
    """Each given tensor is a floating (B,) tensor and all have the same B."""
    shapes = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating torch.Tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D (one value per sequence), got shape {tuple(t.shape)}")
        shapes[name] = t.shape[0]
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: one value per example in each, got " + ", ".join(f"{k} ({v},)" for k, v in shapes.items()))


def _choice(op, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(allowed)}, got {value!r}")


def sequence_logps(per_token_logps, mask=None, *, average=False):
    """(B, T) per-token log-probabilities -> (B,) their sum over each sequence's masked tokens (mask (B, T) 0/1
    or bool; None: all), or with average=True their mean (TRL's average_log_prob: ORPO, SimPO, IPO)."""
    if per_token_logps.dim() != 2:
        raise ValueError(f"sequence_logps: per_token_logps must be (B, T), got shape {tuple(per_token_logps.shape)}")
    if mask is None:
        mask = torch.ones_like(per_token_logps)
    if mask.shape != per_token_logps.shape:
        raise ValueError(f"sequence_logps: mask {tuple(mask.shape)} must match per_token_logps "
                         f"{tuple(per_token_logps.shape)}")
    mask = mask.to(per_token_logps.dtype)
    total = (per_token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def reduce(losses, num_items_in_batch=None):
    """The batch loss of per-example losses: their mean, or their sum / num_items_in_batch (the number of examples
    in the whole accumulated batch, so that accumulated micro-batches give one large batch's gradient)."""
    if num_items_in_batch is None:
        return losses.mean()
    return losses.sum() / num_items_in_batch


def _smoothed_sigmoid(logits, beta, label_smoothing):
    """-(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x): the sigmoid loss, conservative with eps
    (cDPO; TRL's CPO "sigmoid" and "simpo")."""
    loss = -F.logsigmoid(beta * logits) * (1 - label_smoothing)
    return loss - F.logsigmoid(-beta * logits) * label_smoothing if label_smoothing else loss


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """DPO on sequence log-probabilities (B,) of the policy and the reference (None: reference-free, log p_ref =
    0). With delta = (chosen - ref_chosen) - (rejected - ref_rejected):
        sigmoid  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)   (eps = label_smoothing)
        hinge    relu(1 - beta delta)
        ipo      (delta' - 1 / (2 beta))^2, delta' on log-ratios divided by the completion lengths when given
                 (chosen_lengths / rejected_lengths (B,): TRL's normalisation), else on delta as given
        robust   ((1 - eps) (-log sigmoid(beta delta)) + eps log sigmoid(-beta delta)) / (1 - 2 eps)
    -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards = beta * log-ratio, detached: as TRL's
    DPOTrainer (its sigmoid at eps = 0; eps > 0 is the conservative DPO of its earlier releases)."""
    op = "dpo_loss"
    _check(op, chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
           ref_rejected_logps=ref_rejected_logps, chosen_lengths=None if chosen_lengths is None else
           chosen_lengths.float(), rejected_lengths=None if rejected_lengths is None else rejected_lengths.float())
    _choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{op}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(f"{op}: give both reference log-probabilities, or neither (reference-free)")
    chosen = chosen_logps if ref_chosen_logps is None else chosen_logps - ref_chosen_logps
    rejected = rejected_logps if ref_rejected_logps is None else rejected_logps - ref_rejected_logps
    delta = chosen - rejected
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(delta, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is not None or rejected_lengths is not None:
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError(f"{op}: ipo takes both chosen_lengths and rejected_lengths, or neither")
            delta = chosen / chosen_lengths.to(chosen.dtype).clamp(min=1.0) - \
                rejected / rejected_lengths.to(rejected.dtype).clamp(min=1.0)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:  # robust
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def _log1mexp(x):
    """log(1 - e^x) for x < 0, without cancellation (the branch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps, rejected_logps, *, beta=0.1):
    """ORPO's odds-ratio term on average (per-token) sequence log-probabilities, as TRL's ORPOTrainer.odds_ratio_loss:
        log_odds = (chosen - rejected) - (log(1 - e^chosen) - log(1 - e^rejected));  losses = beta log sigmoid(log_odds)
    -> (losses (B,), chosen_rewards, rejected_rewards, mean log sigmoid(log_odds), mean log_odds). ORPO's loss is
    the chosen completions' NLL minus losses.mean()."""
    _check("orpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)  # (fp32 at least: log(1 - e^x) near 0; fp64 kept)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return beta * ratio, (beta * chosen).detach(), (beta * rejected).detach(), ratio.mean(), log_odds.mean()


def cpo_loss(chosen_logps, rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5,
             alpha=0.0):
    """CPO / SimPO (reference-free) on sequence log-probabilities, as TRL's CPOTrainer.cpo_loss: x = chosen -
    rejected (or, with AlphaPO's alpha != 0, the difference of (1 - p^-alpha) / alpha), then
        sigmoid  -(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x);   simpo: the same on x - gamma / beta
        hinge    relu(1 - beta x);   ipo   (x - 1 / (2 beta))^2
    SimPO and IPO take average (length-normalised) log-probabilities (sequence_logps(average=True)).
    -> (losses (B,), chosen_rewards, rejected_rewards). CPO's loss adds cpo_alpha x the chosen NLL."""
    op = "cpo_loss"
    _check(op, chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    _choice(op, "loss_type", loss_type, CPO_LOSS_TYPES)
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if alpha != 0.0:
        chosen = (1 - torch.exp(chosen_logps).pow(-alpha)) / alpha
        rejected = (1 - torch.exp(rejected_logps).pow(-alpha)) / alpha
    else:
        chosen, rejected = chosen_logps, rejected_logps
    x = chosen - rejected
    if loss_type in ("sigmoid", "simpo"):
        losses = _smoothed_sigmoid(x - simpo_gamma / beta if loss_type == "simpo" else x, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * x)
    else:
        losses = (x - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def simpo_loss(chosen_logps, rejected_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO: cpo_loss(loss_type="simpo") on average log-probabilities, with SimPO's beta and gamma."""
    return cpo_loss(chosen_logps, rejected_logps, beta=beta, loss_type="simpo", label_smoothing=label_smoothing,
                    simpo_gamma=gamma)


def kto_loss(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,  # noqa: N803
             reference_rejected_logps, reference_KL_logps, *, beta=0.1, desirable_weight=1.0,  # noqa: N803
             undesirable_weight=1.0, loss_type="kto"):
    """KTO on the sequence log-probabilities of the desirable (chosen) and undesirable (rejected) examples of a batch,
    as TRL's KTOTrainer: the KL baseline z = clamp(mean(policy_KL - reference_KL), min=0), detached, from the
    mismatched (prompt, completion) pairs (None for either: z = 0), then
        kto                chosen: 1 - sigmoid(beta (log-ratio - z));  rejected: 1 - sigmoid(beta (z - log-ratio))
        apo_zero_unpaired  chosen: 1 - sigmoid(beta log-ratio);       rejected: sigmoid(beta log-ratio)
    -> (losses (n_chosen + n_rejected,): desirable_weight x chosen then undesirable_weight x rejected, chosen_rewards,
    rejected_rewards, kl)."""
    op = "kto_loss"
    _check(op, policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    _check(op, policy_rejected_logps=policy_rejected_logps, reference_rejected_logps=reference_rejected_logps)
    _check(op, policy_KL_logps=policy_KL_logps, reference_KL_logps=reference_KL_logps)
    _choice(op, "loss_type", loss_type, KTO_LOSS_TYPES)
    if policy_KL_logps is None or reference_KL_logps is None or loss_type == "apo_zero_unpaired":
        kl = torch.zeros((), device=policy_chosen_logps.device)
    else:
        kl = (policy_KL_logps - reference_KL_logps).mean().detach().clamp(min=0)
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen)
        rejected_losses = torch.sigmoid(beta * rejected)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, (beta * chosen).detach(), (beta * rejected).detach(), kl


class GRPOOutput(NamedTuple):
    """grpo_loss's result: the loss, and what TRL logs of it (detached)."""
    loss: torch.Tensor
    mean_kl: torch.Tensor | None  # the masked mean of the per-token KL to the reference (None when beta == 0)
    clip_ratio: torch.Tensor  # the fraction of masked tokens whose ratio was clipped (low or high side)


def grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, ref_per_token_logps=None,
              beta=0.0, epsilon_low=0.2, epsilon_high=None, loss_type="dapo", max_completion_length=None,
              num_items_in_batch=None, importance_sampling_level="token", delta=None):
    """GRPO's token-level clipped surrogate, as TRL's GRPOTrainer (per micro-batch, before its division by the
    gradient-accumulation steps): with r = exp(logp - old_logp) (per token, or, importance_sampling_level
    "sequence", one masked-mean ratio per sequence), A the advantages (B,) or (B, T):
        per_token = -min(r A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) A)      (r capped at delta when given)
                    + beta (e^{ref - logp} - (ref - logp) - 1)                      (the k3 KL, when beta != 0)
    normalised over the completion mask M as loss_type says:
        grpo     mean over sequences of each sequence's masked mean
        bnpo     sum / sum(M)                     dr_grpo  sum / (B x max_completion_length)
        dapo     sum / num_items_in_batch (the completion tokens of the whole accumulated batch; this batch's
                 when not given)
    old_per_token_logps None: the current ones, detached (one update per generation). -> GRPOOutput."""
    op = "grpo_loss"
    _choice(op, "loss_type", loss_type, GRPO_LOSS_TYPES)
    _choice(op, "importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    if per_token_logps.dim() != 2:
        raise ValueError(f"{op}: per_token_logps must be (B, T), got shape {tuple(per_token_logps.shape)}")
    for name, t in (("old_per_token_logps", old_per_token_logps), ("ref_per_token_logps", ref_per_token_logps),
                    ("completion_mask", completion_mask)):
        if t is not None and t.shape != per_token_logps.shape:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must match per_token_logps {tuple(per_token_logps.shape)}")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError(f"{op}: beta = {beta} needs ref_per_token_logps (the reference model's per-token log-probs)")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError(f"{op}: loss_type 'dr_grpo' divides by max_completion_length; give it")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.to(per_token_logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    mean_kl = None
    if beta != 0.0:
        d = ref_per_token_logps - per_token_logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        mean_kl = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype,
                                                                          device=mask.device)
        loss = (per_token * mask).sum() / n.clamp(min=1.0)
    clipped = ((coef_1 < 1 - epsilon_low) & (adv < 0)) | ((coef_1 > 1 + epsilon_high) & (adv > 0))
    clip_ratio = ((clipped.expand_as(mask) * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    return GRPOOutput(loss, mean_kl, clip_ratio)
