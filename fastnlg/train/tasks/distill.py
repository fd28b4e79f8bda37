"""Distillation (`fastnlg train --objective distill --teacher FOLDER`): the student learns the teacher's next-token
distribution on the training data's target tokens (the causal-LM task's data formats, packing included),
through fastnlg.ops.fused_linear_distillation_loss: neither model's (tokens x vocab) logits are made.

    --distill-loss forward_kl (default) | reverse_kl | jsd (--distill-beta), --distill-temperature: TRL GKD's
    generalized_jsd_loss definitions on the data's tokens (supervised KD: no generation)

The teacher is a causal-LM folder with the student's vocabulary and tokenizer (a built-in student config takes
the teacher's tokenizer); it is loaded frozen, in the run's compute dtype, patched as the student is, and never
saved. The step's loss is the divergence summed over the step's target tokens / their number (exact gradient
accumulation). Held out: eval_loss is the divergence per target token; eval_ce_loss, perplexity and token
accuracy are the student's own next-token figures on the same tokens.
"""
from __future__ import annotations

import torch

from ...ops import fused_linear_distillation_loss
from ..errors import ConfigError
from ..evaluate import loss_metrics
from .causal_lm import CausalLM, check_logits, encoder_kind
from .preference import final_hidden


class Distill(CausalLM):
    """distill: the causal-LM task's rows, the loss against the teacher (loaded at the first step)."""

    token_accuracy = False  # (the student's head is not run as a module: no fused-head accuracy counts)

    def __init__(self):
        self.teacher = None
        self._loss_name = "divergence"

    def check_model(self, config, path):
        super().check_model(config, path)
        check_logits(config, path, "objective=distill")

    def rows(self, cfg, tok, dist):
        self.check_teacher(cfg, tok)
        return super().rows(cfg, tok, dist)

    @staticmethod
    def check_teacher(cfg, tok):
        """The teacher folder is a causal LM whose tokenizer is the student's (ConfigError before any work)."""
        from ...loading import load_config, load_tokenizer

        config = load_config(cfg.teacher)
        if encoder_kind(config):
            raise ConfigError(f"teacher={cfg.teacher!r} is not allowed: it is {encoder_kind(config)} "
                              f"({config.model_type}); distillation takes a causal-LM teacher")
        check_logits(config, cfg.teacher, "teacher")
        theirs = load_tokenizer(cfg.teacher).get_vocab()
        ours = tok.get_vocab()
        if theirs != ours:
            diff = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:1]
            raise ConfigError(f"teacher={cfg.teacher!r} is not allowed: its tokenizer differs from the student's "
                              f"({len(theirs)} vs {len(ours)} tokens; first difference {diff[0] if diff else '?'}); "
                              "distillation compares the two models' distributions token by token")
        if config.vocab_size < len(ours):
            raise ConfigError(f"teacher={cfg.teacher!r} is not allowed: its vocabulary has {config.vocab_size} rows, "
                              f"fewer than the tokenizer's {len(ours)} tokens")

    def _teacher(self, cfg, device):
        if self.teacher is None:
            from ...loading import load_pretrained

            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
            teacher = load_pretrained(cfg.teacher, dtype=dtype, device=device).requires_grad_(False).eval()
            if cfg.patch:
                from ...patching import patch

                patch(teacher)
            self.teacher = teacher
        return self.teacher

    def divergence(self, model, batch, cfg, num_items):
        """The batch's divergence summed over its target tokens / num_items."""
        hs, labels, head = final_hidden(model, batch)
        teacher = self._teacher(cfg, hs.device)
        with torch.no_grad():
            ht, _, teacher_head = final_hidden(teacher, batch)
        if teacher_head.weight.shape[0] != head.weight.shape[0]:
            raise ConfigError(f"teacher={cfg.teacher!r}: its LM head has {teacher_head.weight.shape[0]} vocabulary "
                              f"rows, the student's {head.weight.shape[0]}; distillation needs the same vocabulary")
        if head.bias is not None or teacher_head.bias is not None:
            raise ConfigError("objective=distill: an LM head with a bias is not supported yet")
        return fused_linear_distillation_loss(
            hs.reshape(-1, hs.shape[-1]), head.weight, ht.reshape(-1, ht.shape[-1]), teacher_head.weight,
            labels.reshape(-1), loss=cfg.distill_loss, beta=cfg.distill_beta, temperature=cfg.distill_temperature,
            num_items_in_batch=num_items)

    def training_loss(self, model, batch, cfg, n_step):
        self._loss_name = cfg.distill_loss
        return self.divergence(model, batch, cfg, n_step)

    def evaluate(self, model, rows, tok, cfg, device, dist):
        own = loss_metrics(model, rows, tok.pad_token_id, cfg.batch_size, device, dist)
        was = model.training
        model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for i in range(0, len(rows), cfg.batch_size):  # (every process takes all rows: the same sum)
                    batch = {k: v.to(device) for k, v in self.collate(rows[i:i + cfg.batch_size],
                                                                      tok.pad_token_id).items()}
                    total += float(self.divergence(model, batch, cfg, 1))
        finally:
            model.train(was)
        return {"eval_loss": total / own["eval_tokens"], "eval_ce_loss": own["eval_loss"],
                **{k: v for k, v in own.items() if k != "eval_loss"}}

    def summary(self, m):
        return (f"eval {m['eval_loss']:.4f} {self._loss_name}, student perplexity {m['eval_perplexity']:.2f}, "
                f"token accuracy {m['eval_token_accuracy']:.3f}")
