"""Preference tuning of a causal LM (`fastnlg train --objective dpo | simpo | orpo`): pairs of completions of one
prompt, the preferred one first, trained with fastnlg.losses on log-probabilities from
fastnlg.ops.fused_linear_logprobs (the (tokens x vocab) logits never exist, for the policy or the reference).
KTO's unpaired examples are tasks/kto.py, built on this.

Data: JSONL records {"prompt", "chosen", "rejected"}: strings (the completion follows the prompt as in
prompt/completion SFT data, EOS appended), or chat messages (prompt a list of turns, chosen / rejected a string
or a list of assistant turns; the tokenizer's chat template renders them). A missing or extra field, an empty
completion, or chosen equal to rejected stops with the file and line.

Objectives:
    dpo    dpo_loss (sigmoid) on the completions' summed log-probabilities against the reference model's: with
           LoRA / QLoRA / IA3 / ... the base with the adapter disabled (no second copy); with method=full a frozen
           copy of the initial model
    simpo  simpo_loss on the completions' mean log-probabilities (reference-free), beta and simpo_gamma
    orpo   the chosen completion's NLL (its mean over its tokens: the ORPO paper's per-example L_SFT; TRL's
           ORPOTrainer averages over the batch's chosen tokens instead, the same when they have equal lengths)
           minus orpo_loss's beta x log sigmoid(log odds ratio) on mean log-probabilities (reference-free)
The step's loss is the sum over its pairs / the pairs of the whole step (exact gradient accumulation).
Logged: the loss, the reward margin (chosen - rejected reward) and the preference accuracy (the share of pairs
whose chosen reward is higher); held out the same, with eval_loss the mean preference loss.
"""
from __future__ import annotations

import copy

import torch

from ... import losses
from ...ops import fused_linear_logprobs
from .. import data
from ..config import REFERENCE
from ..errors import ConfigError, DataError
from .causal_lm import CausalLM, check_logits

FIELDS = ("prompt", "chosen", "rejected")


def _completion(value, key, where):
    """A completion as chat turns: a string (one assistant turn) or a list of assistant turns."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") == "assistant"
                                                 and isinstance(m.get("content"), str) for m in value):
        return value
    raise DataError(f"{where}: field {key!r} must be a string or a list of assistant turns "
                    "({\"role\": \"assistant\", \"content\": ...})")


def tokenize_pair(record: dict, tok, max_length: int, truncate: bool, where: str):
    """(chosen Sample, rejected Sample) of one record, checked."""
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise DataError(f"{where}: a preference record needs {{prompt, chosen, rejected}}; field {missing[0]!r} is "
                        "missing")
    extra = sorted(set(record) - set(FIELDS))
    if extra:
        raise DataError(f"{where}: field {extra[0]!r} is not used by a preference objective (records: "
                        "{prompt, chosen, rejected})")
    prompt = record["prompt"]
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: chosen and rejected are the same completion (the pair prefers nothing)")
    pair = []
    for key in ("chosen", "rejected"):
        if isinstance(prompt, str) and isinstance(record[key], str):
            s = data.tokenize({"prompt": prompt, "completion": data._string(record, key, where)}, "prompt_completion",
                              tok, where)
        elif isinstance(prompt, list):
            s = data.tokenize({"messages": prompt + _completion(record[key], key, where)}, "chat", tok, where)
        else:
            raise DataError(f"{where}: field 'prompt' must be a string, or a list of chat turns (then chosen and "
                            "rejected are strings or assistant turns)")
        if len(s.ids) > max_length:
            if not truncate:
                raise DataError(f"{where}: the {key} completion has {len(s.ids)} tokens > max_length {max_length} "
                                "(truncation is off)")
            s.ids, s.labels = s.ids[:max_length], s.labels[:max_length]
        if all(label == data.IGNORE for label in s.labels[1:]):
            raise DataError(f"{where}: the {key} completion has no tokens left after the prompt (truncated away by "
                            f"max_length {max_length})")
        pair.append(s)
    if pair[0].ids == pair[1].ids:
        raise DataError(f"{where}: chosen and rejected are the same tokens after truncation to max_length "
                        f"{max_length}")
    return tuple(pair)


def load_pairs(paths, tok, max_length, truncate) -> list:
    return [tokenize_pair(record, tok, max_length, truncate, where)
            for path in ([paths] if isinstance(paths, str) else paths) for record, where in data.read_records(path)]


def _unwrap(model):
    """The Transformers model under DDP and PEFT wrappers, and the PEFT model (or None)."""
    model = getattr(model, "module", model)
    peft = model if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model") else None
    return (peft.get_base_model() if peft is not None else model), peft


INPUTS = ("input_ids", "attention_mask", "position_ids")  # what the backbone gets of a batch (packed rows: positions)


def final_hidden(model, batch):
    """(the backbone's last hidden states (B, T - 1, C) before each next token, those next tokens' labels
    (B, T - 1), the LM head module) of a batch: the causal LM without its head, so that a fused op takes the
    head's weight and no (tokens x vocab) logits are made."""
    lm, _ = _unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    out = backbone(**{k: batch[k] for k in INPUTS if k in batch}, use_cache=False)
    return out.last_hidden_state[:, :-1], batch["labels"][:, 1:], lm.get_output_embeddings()


def completion_logps(model, batch):
    """(summed log p of each row's completion (rows,), its token count (rows,)) through the backbone and the fused
    log-prob op on the LM head (no logits)."""
    hidden, labels, head = final_hidden(model, batch)
    B, T, C = hidden.shape
    logp = fused_linear_logprobs(hidden.reshape(-1, C), head.weight, labels.reshape(-1), bias=head.bias)
    mask = labels != data.IGNORE
    return losses.sequence_logps(logp.view(B, T), mask), mask.sum(-1)


class Preference(CausalLM):
    """dpo / simpo / orpo over pairs (the Task interface of tasks/__init__.py; rows are (chosen, rejected)
    Samples)."""

    token_accuracy = False

    def __init__(self, objective: str = "dpo", reference_free: bool = False):
        self.objective = objective
        self.reference_free = reference_free  # dpo with log p_ref = 0 (fastnlg eval of a model without a reference)
        self._reference = None  # method=full + dpo: the frozen initial model (or the one fastnlg eval --reference gave)
        self._stats = None  # [pairs, margin sum, correct, chosen reward sum, rejected reward sum] since the last log

    def check_model(self, config, path):
        super().check_model(config, path)
        check_logits(config, path, f"objective={self.objective}")

    def corpus(self, paths):
        return [" ".join(str(record.get(k, "")) for k in FIELDS) for path in paths
                for record, _ in data.read_records(path)]

    def rows(self, cfg, tok, dist):
        if dist.on:
            raise ConfigError(f"objective={self.objective} runs on one process (DDP / FSDP not yet)")
        pairs = load_pairs(cfg.train_files, tok, cfg.max_length, cfg.truncate)
        if cfg.eval_files:
            return pairs, load_pairs(cfg.eval_files, tok, cfg.max_length, cfg.truncate), "preference"
        train, held = data.split(pairs, cfg.eval_fraction, cfg.seed)
        return train, held, "preference"

    def held_out(self, cfg, tok):
        return load_pairs(cfg.eval_files, tok, cfg.max_length, cfg.truncate)

    def count(self, rows):
        return len(rows)

    def collate(self, rows, pad_id):
        """The chosen completions, then the rejected ones, right-padded into one batch (2B, T)."""
        return data.collate(data.pad_rows([c for c, _ in rows] + [r for _, r in rows], pad_id), pad_id)

    def batch_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def _reference_logps(self, model, batch):
        """The reference model's completion log-probabilities of a batch (None for a reference-free objective)."""
        if self.objective not in REFERENCE:
            return None
        if self.reference_free:
            return torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        lm, peft = _unwrap(model)
        with torch.no_grad():
            if peft is not None:
                with peft.disable_adapter():
                    return completion_logps(model, batch)[0]
            if self._reference is None:  # the first call sees the initial weights (resume is refused for this)
                self._reference = copy.deepcopy(lm).requires_grad_(False)
            was = self._reference.training
            self._reference.train(lm.training)  # (dropout as the policy's: TRL's reference runs in the same mode)
            try:
                return completion_logps(self._reference, batch)[0]
            finally:
                self._reference.train(was)

    def pair_losses(self, model, batch, cfg):
        """(per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)) of a collated batch."""
        ref = self._reference_logps(model, batch)
        logps, n = completion_logps(model, batch)
        B = logps.shape[0] // 2
        if self.objective == "dpo":
            return losses.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=cfg.beta)
        mean = logps / n.clamp(min=1).to(logps.dtype)
        if self.objective == "orpo":
            odds, chosen, rejected, _, _ = losses.orpo_loss(mean[:B], mean[B:], beta=cfg.beta)
            return -mean[:B] - odds.to(mean.dtype), chosen, rejected
        return losses.simpo_loss(mean[:B], mean[B:], beta=cfg.beta, gamma=cfg.simpo_gamma)

    def _pair_stats(self, per_pair, chosen, rejected):
        """[pairs, margin sum, correct, chosen reward sum, rejected reward sum] of a batch (fp32, detached)."""
        return torch.stack([torch.tensor(float(per_pair.shape[0]), device=per_pair.device), (chosen - rejected).sum(),
                            (chosen > rejected).sum().to(chosen.dtype), chosen.sum(), rejected.sum()]).detach().float()

    def training_loss(self, model, batch, cfg, n_step):
        per_pair, chosen, rejected = self.pair_losses(model, batch, cfg)
        stats = self._pair_stats(per_pair, chosen, rejected)
        self._stats = stats if self._stats is None else self._stats + stats
        return per_pair.sum() / n_step

    @staticmethod
    def _summary_of(s, prefix=""):
        n = max(float(s[0]), 1.0)
        return {f"{prefix}reward_margin": float(s[1]) / n, f"{prefix}preference_accuracy": float(s[2]) / n,
                f"{prefix}rewards_chosen": float(s[3]) / n, f"{prefix}rewards_rejected": float(s[4]) / n}

    def train_stats(self, dist):
        if self._stats is None:
            return {}
        out, self._stats = self._summary_of(dist.all_sum(self._stats)), None
        return out

    def evaluate(self, model, rows, tok, cfg, device, dist):
        was = model.training
        model.eval()
        total = None
        loss_sum = 0.0
        try:
            with torch.no_grad():
                for i in range(0, len(rows), cfg.batch_size):
                    batch = {k: v.to(device) for k, v in self.collate(rows[i:i + cfg.batch_size],
                                                                      tok.pad_token_id).items()}
                    per_pair, chosen, rejected = self.pair_losses(model, batch, cfg)
                    loss_sum += float(per_pair.sum())
                    stats = self._pair_stats(per_pair, chosen, rejected)
                    total = stats if total is None else total + stats
        finally:
            model.train(was)
        total = total if total is not None else torch.zeros(7)
        return {"eval_loss": loss_sum / max(len(rows), 1), **self._summary_of(total, "eval_")}

    def summary(self, m):
        return (f"eval loss {m['eval_loss']:.4f}, preference accuracy {m['eval_preference_accuracy']:.3f}, "
                f"reward margin {m['eval_reward_margin']:.3f}")
