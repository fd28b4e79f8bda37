"""Masked-LM training of an encoder: {"text"} records (or .txt lines), masked through Transformers'
DataCollatorForLanguageModeling (mlm_probability of the tokens, 80% [MASK] / 10% random / 10% kept) on each
global micro-batch, seeded by the run's seed; the held-out rows are masked once (the same masks at every
evaluation). Held out: loss, perplexity and accuracy over the masked tokens."""
from __future__ import annotations

import math

from .. import data
from ..data import IGNORE
from ..errors import ConfigError, DataError
from . import Task, encoder_data


class MaskedLM(Task):
    name = "masked-lm"
    auto_class = "AutoModelForMaskedLM"

    def check_model(self, config, path):
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ConfigError(f"task='masked-lm' is not allowed: {path} ({config.model_type}) has no masked-LM head; "
                              "use --task causal-lm")

    def _collator(self, tok, cfg, seed):
        from transformers import DataCollatorForLanguageModeling

        if tok.mask_token is None:
            raise ConfigError(f"task='masked-lm' is not allowed: the tokenizer of {cfg.model} has no mask token")
        return DataCollatorForLanguageModeling(tok, mlm_probability=cfg.mlm_probability, seed=seed)

    def rows(self, cfg, tok, dist):
        examples = [e for p in cfg.train_files for e in encoder_data.read_texts(p)]
        held = [e for p in cfg.eval_files for e in encoder_data.read_texts(p)]
        if not held:
            examples, held = data.split(examples, cfg.eval_fraction, cfg.seed)
        train_rows = encoder_data.text_rows(examples, tok, cfg.max_length)
        if len(train_rows) < cfg.batch_size * dist.world:
            raise DataError(f"{cfg.train_files[0]}: {len(train_rows)} training texts, fewer than one global batch "
                            f"(batch_size {cfg.batch_size} x {dist.world} processes)")
        self.masker = self._collator(tok, cfg, cfg.seed)
        eval_rows = _masked(self._collator(tok, cfg, cfg.seed + 1), encoder_data.text_rows(held, tok, cfg.max_length))
        return train_rows, eval_rows, f"masked-lm (mask probability {cfg.mlm_probability})"

    def held_out(self, cfg, tok):
        held = [e for p in cfg.eval_files for e in encoder_data.read_texts(p)]
        return _masked(self._collator(tok, cfg, cfg.seed + 1), encoder_data.text_rows(held, tok, cfg.max_length))

    def prepare(self, rows):
        return _masked(self.masker, rows)

    def collate(self, rows, pad_id):
        return data.collate(rows, pad_id)

    def evaluate(self, model, rows, tok, cfg, device, dist):
        loss_sum = correct = count = 0.0
        for _, batch, out in self.eval_batches(model, rows, lambda c: self.collate(c, tok.pad_token_id),
                                               cfg.batch_size, device):
            keep = batch["labels"] != IGNORE
            n = int(keep.sum())
            loss_sum += float(out.loss) * n
            correct += int((out.logits.argmax(-1)[keep] == batch["labels"][keep]).sum())
            count += n
        if not count:
            raise DataError("masked-lm evaluation: no masked token in the held-out texts (too few or too short)")
        loss = loss_sum / count
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_token_accuracy": correct / count,
                "eval_tokens": int(count)}

    def summary(self, m):
        return (f"eval loss {m['eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f}, masked-token accuracy "
                f"{m['eval_token_accuracy']:.3f}")


def _masked(collator, rows):
    """The rows with their tokens masked by `collator` (input_ids replaced, labels -100 where not masked)."""
    if not rows:
        return rows
    batch = collator([{"input_ids": r["input_ids"].tolist()} for r in rows])
    out = []
    for j, r in enumerate(rows):
        n = r["input_ids"].numel()
        out.append({**{k: v for k, v in r.items() if k != "labels"}, "input_ids": batch["input_ids"][j, :n].clone(),
                    "labels": batch["labels"][j, :n].clone()})
    return out
