"""The causal-LM task (the default): the data formats of train/data.py, packed or padded rows, the next-token
loss over the step's target tokens (num_items_in_batch), loss / perplexity / token accuracy held out."""
from __future__ import annotations

from .. import data
from ..errors import ConfigError
from ..evaluate import loss_metrics
from . import Task


def encoder_kind(config) -> str | None:
    """"an encoder-decoder" / "an encoder" when the config is one (a causal-LM run would drop or misuse its
    weights), else None."""
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    decoder_heads = [a for a in (getattr(config, "architectures", None) or [])
                     if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) \
            and not decoder_heads:
        return "an encoder"
    return None


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_logits(config, path, what):
    """A ConfigError when the model transforms its logits, which the fused log-prob and distillation ops
    (preference objectives, distillation) do not apply yet."""
    for key in LOGIT_TRANSFORMS:
        if getattr(config, key, None) not in (None, 1.0):
            raise ConfigError(f"{what}: {path} transforms its logits ({key}={getattr(config, key)}), which the fused "
                              "log-prob / distillation ops do not apply yet")


class CausalLM(Task):
    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    token_accuracy = True

    def check_model(self, config, path):
        kind = encoder_kind(config)
        if kind == "an encoder":
            raise ConfigError(f"task='causal-lm' is not allowed: {path} is an encoder ({config.model_type}, "
                              "attending both ways); use --task token-classification, sequence-classification or "
                              "masked-lm")
        if kind:
            raise ConfigError(f"task='causal-lm' is not allowed: {path} is an encoder-decoder ({config.model_type}); "
                              "a causal-LM run would drop its encoder; use --task seq2seq")

    def rows(self, cfg, tok, dist):
        samples, fmt = data.load_samples(cfg.train_files, tok, cfg.max_length, cfg.truncate)
        if cfg.eval_files:
            train_samples = samples
            eval_samples, _ = data.load_samples(cfg.eval_files, tok, cfg.max_length, cfg.truncate)
        else:
            train_samples, eval_samples = data.split(samples, cfg.eval_fraction, cfg.seed)
        pad = tok.pad_token_id
        train_rows = data.pack(train_samples, cfg.max_length, pad) if cfg.packing else data.pad_rows(train_samples, pad)
        return train_rows, data.pad_rows(eval_samples, pad), fmt

    def count(self, rows):
        return sum(data.target_tokens(r) for r in rows)

    def collate(self, rows, pad_id):
        return data.collate(rows, pad_id)

    def forward_kwargs(self, n_step):
        return {"num_items_in_batch": n_step, "use_cache": False}  # (packing needs no cache)

    def evaluate(self, model, rows, tok, cfg, device, dist):
        return loss_metrics(model, rows, tok.pad_token_id, cfg.batch_size, device, dist)

    def summary(self, m):
        return (f"eval loss {m['eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f}, token accuracy "
                f"{m['eval_token_accuracy']:.3f}")
