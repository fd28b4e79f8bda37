"""KTO (`fastnlg train --objective kto`): unpaired examples, each a completion of a prompt labelled desirable or
not, trained with fastnlg.losses.kto_loss on log-probabilities from fastnlg.ops.fused_linear_logprobs (no logits),
against the reference model as DPO's (tasks/preference.py: the adapter-disabled base, or a frozen copy with
method=full).

Data: JSONL records {"prompt", "completion", "label"}: label true (desirable) or false (undesirable); prompt and
completion strings, or chat turns as preference pairs take them. A missing or extra field, a label that is not
a boolean, or an empty completion stops with the file and line.

The KL baseline z of each micro-batch, as TRL's KTOTrainer: every prompt with the completion of the example
before it in the micro-batch (the completions shifted by one), the policy's and the reference's log-ratios of
these mismatched pairs averaged, clamped at 0 and detached (so batch_size >= 2). Losses: desirable_weight x
(1 - sigmoid(beta (log-ratio - z))), undesirable_weight x (1 - sigmoid(beta (z - log-ratio))); the step's loss
is their sum over the step's examples / their number (exact gradient accumulation).
Logged: the loss, rewards_chosen / rewards_rejected (the mean beta x log-ratio of the desirable / undesirable
examples), their difference as reward_margin, and kl (z); held out the same.
"""
from __future__ import annotations

import torch

from ... import losses
from .. import data
from ..errors import DataError
from .preference import Preference, _completion, completion_logps

FIELDS = ("prompt", "completion", "label")


def tokenize_example(record: dict, tok, max_length: int, truncate: bool, where: str):
    """(Sample, its prompt's token count, label) of one record, checked."""
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise DataError(f"{where}: a KTO record needs {{prompt, completion, label}}; field {missing[0]!r} is missing")
    extra = sorted(set(record) - set(FIELDS))
    if extra:
        raise DataError(f"{where}: field {extra[0]!r} is not used by objective=kto (records: "
                        "{prompt, completion, label})")
    label = record["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(completion, str) and not completion.strip():
        raise DataError(f"{where}: field 'completion' is empty")
    if isinstance(prompt, str) and isinstance(completion, str):
        s = data.tokenize({"prompt": prompt, "completion": data._string(record, "completion", where)},
                          "prompt_completion", tok, where)
    elif isinstance(prompt, list):
        s = data.tokenize({"messages": prompt + _completion(completion, "completion", where)}, "chat", tok, where)
    else:
        raise DataError(f"{where}: field 'prompt' must be a string, or a list of chat turns (then completion is a "
                        "string or assistant turns)")
    if len(s.ids) > max_length:
        if not truncate:
            raise DataError(f"{where}: the example has {len(s.ids)} tokens > max_length {max_length} (truncation "
                            "is off)")
        s.ids, s.labels = s.ids[:max_length], s.labels[:max_length]
    if all(lab == data.IGNORE for lab in s.labels[1:]):
        raise DataError(f"{where}: the completion has no tokens left after the prompt (truncated away by "
                        f"max_length {max_length})")
    prompt_len = next(i for i, lab in enumerate(s.labels) if lab != data.IGNORE)
    return s, prompt_len, label


def mismatched(rows: list, max_length: int) -> list:
    """The KL baseline's Samples: row i's prompt with row i-1's completion (TRL's shift by one), truncated."""
    out = []
    for i, (s, k, _) in enumerate(rows):
        other, j, _ = rows[i - 1]
        ids = (s.ids[:k] + other.ids[j:])[:max_length]
        labels = ([data.IGNORE] * k + other.ids[j:])[:max_length]
        out.append(data.Sample(ids, labels, s.where))
    return out


class KTO(Preference):
    """kto over unpaired examples (rows: (Sample, prompt length, label))."""

    def __init__(self, objective: str = "kto", reference_free: bool = False):
        super().__init__(objective, reference_free)
        self.max_length = None  # the KL rows' length cap (set with the rows)
        self._kl = None  # the last micro-batch's KL baseline (for its stats)

    def corpus(self, paths):
        return [f"{record.get('prompt', '')} {record.get('completion', '')}" for path in paths
                for record, _ in data.read_records(path)]

    def _load(self, paths, tok, cfg):
        self.max_length = cfg.max_length
        return [tokenize_example(record, tok, cfg.max_length, cfg.truncate, where)
                for path in ([paths] if isinstance(paths, str) else paths) for record, where in data.read_records(path)]

    def rows(self, cfg, tok, dist):
        from ..errors import ConfigError

        if dist.on:
            raise ConfigError("objective=kto runs on one process (DDP / FSDP not yet)")
        rows = self._load(cfg.train_files, tok, cfg)
        if cfg.eval_files:
            return rows, self._load(cfg.eval_files, tok, cfg), "kto"
        train, held = data.split(rows, cfg.eval_fraction, cfg.seed)
        return train, held, "kto"

    def held_out(self, cfg, tok):
        return self._load(cfg.eval_files, tok, cfg)

    def collate(self, rows, pad_id):
        """The examples (B, T), their mismatched KL rows as kl_* (B, T'), and desirable (B,) bool."""
        batch = data.collate(data.pad_rows([s for s, _, _ in rows], pad_id), pad_id)
        kl = data.collate(data.pad_rows(mismatched(rows, self.max_length), pad_id), pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([label for _, _, label in rows])
        return batch

    def batch_tokens(self, batch):
        return int(batch["attention_mask"].sum() + batch["kl_attention_mask"].sum())

    def pair_losses(self, model, batch, cfg):
        """(per-example losses (B,), rewards of the desirable ones, rewards of the undesirable ones), the
        micro-batch's KL baseline kept for the log."""
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        ref, ref_kl = self._reference_logps(model, batch), self._reference_logps(model, kl_batch)
        with torch.no_grad():  # (the baseline is detached: TRL runs these rows without grad too)
            policy_kl = completion_logps(model, kl_batch)[0]
        logps = completion_logps(model, batch)[0]
        good = batch["desirable"]
        per, chosen, rejected, kl = losses.kto_loss(
            logps[good], logps[~good], policy_kl, ref[good], ref[~good], ref_kl, beta=cfg.beta,
            desirable_weight=cfg.kto_desirable_weight, undesirable_weight=cfg.kto_undesirable_weight)
        self._kl = kl
        return per, chosen, rejected

    def _pair_stats(self, per, chosen, rejected):
        """[examples, desirable, undesirable, desirable reward sum, undesirable reward sum, KL baseline sum,
        micro-batches] (fp32, detached)."""
        def n(t):
            return torch.tensor(float(t.shape[0]), device=per.device)

        return torch.stack([n(per), n(chosen), n(rejected), chosen.sum(), rejected.sum(), self._kl.to(per),
                            torch.ones((), device=per.device)]).detach().float()

    @staticmethod
    def _summary_of(s, prefix=""):
        chosen = float(s[3]) / max(float(s[1]), 1.0)
        rejected = float(s[4]) / max(float(s[2]), 1.0)
        return {f"{prefix}rewards_chosen": chosen, f"{prefix}rewards_rejected": rejected,
                f"{prefix}reward_margin": chosen - rejected, f"{prefix}kl": float(s[5]) / max(float(s[6]), 1.0)}

    def summary(self, m):
        return (f"eval loss {m['eval_loss']:.4f}, reward margin {m['eval_reward_margin']:.3f} (desirable "
                f"{m['eval_rewards_chosen']:.3f}, undesirable {m['eval_rewards_rejected']:.3f}), kl {m['eval_kl']:.3f}")
