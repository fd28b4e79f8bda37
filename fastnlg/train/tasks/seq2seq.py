"""Sequence-to-sequence fine-tuning of an encoder-decoder (T5, Flan-T5, mT5, BART, mBART, Pegasus): summaries,
data-to-text, any text -> text.

Records (JSONL, one object per line; the form is taken from the first record, every record has its fields):
    {"source": "...", "target": "..."}
    {"document": "...", "summary": "..."}
    {"input": "...", "output": "..."}
    {"input": {field: value, ...}, "output": "..."}   data-to-text: the record rendered as the source text by
                                                       train/data.py's DATA_TO_TEXT_PROMPT, as causal-lm does
The source goes to the encoder, the target is the labels (the model makes its decoder inputs from them); the
loss is on the target tokens only, each text ending in EOS. Texts longer than max_length are truncated (EOS
kept) or, with truncate=false, refused. Held out: loss, perplexity and token accuracy over the target
tokens; `fastnlg eval` adds BLEU, ROUGE-1/2/L (and slot accuracy for records) through generate.
"""
from __future__ import annotations

import torch

from .. import data
from ..data import IGNORE
from ..errors import ConfigError, DataError
from . import Task

FORMS = (("source", "target"), ("document", "summary"), ("input", "output"))


class Example:
    __slots__ = ("source", "target", "fields", "where")

    def __init__(self, source: str, target: str, fields: dict | None, where: str):
        self.source, self.target, self.fields, self.where = source, target, fields, where


def _form(record: dict, where: str) -> tuple:
    for form in FORMS:
        if all(k in record for k in form):
            extra = sorted(set(record) - set(form))
            if extra:
                raise DataError(f"{where}: field {extra[0]!r} is not used by --task seq2seq ({{{', '.join(form)}}} "
                                "records)")
            return form
    raise DataError(f"{where}: --task seq2seq records need one of " + ", ".join("{" + ", ".join(f) + "}" for f in FORMS)
                    + f"; this one has {sorted(record)}")


def read_examples(paths) -> list:
    """Every record of the files as an Example (checked: the same form throughout, non-empty strings)."""
    out, form = [], None
    for path in ([paths] if isinstance(paths, str) else paths):
        for record, where in data.read_records(path):
            this = _form(record, where)
            form = form or this
            if this != form:
                raise DataError(f"{where}: a {{{', '.join(this)}}} record in a {{{', '.join(form)}}} data set "
                                "(forms cannot be mixed)")
            src, tgt = record[form[0]], record[form[1]]
            fields = None
            if form[0] == "input" and isinstance(src, dict):
                if not src:
                    raise DataError(f"{where}: field 'input' is an empty object (no fields to render)")
                fields, src = src, data.render_data_to_text(src)
            for key, value in ((form[0], src), (form[1], tgt)):
                if not isinstance(value, str):
                    raise DataError(f"{where}: field {key!r} must be a string"
                                    + (" or an object of fields" if key == "input" else "")
                                    + f", got {type(value).__name__}")
                if not value.strip():
                    raise DataError(f"{where}: field {key!r} is empty")
            out.append(Example(src, tgt, fields, where))
    return out


def _ids(tok, text: str, max_length: int, truncate: bool, where: str, target: bool) -> list:
    """The tokenizer's ids of `text` (its own special tokens; a target as text_target), ending in EOS."""
    enc = tok(text_target=text) if target else tok(text)
    ids = list(enc["input_ids"])
    eos = tok.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) > max_length:
        if not truncate:
            raise DataError(f"{where}: the {'target' if target else 'source'} is {len(ids)} tokens > max_length "
                            f"{max_length} (truncation is off)")
        ids = ids[:max_length - 1] + ([eos] if eos is not None else ids[max_length - 1:max_length])
    return ids


def rows_of(examples: list, tok, max_length: int, truncate: bool = True) -> list:
    """{"input_ids", "attention_mask", "labels"} per example (DataError naming the record when too long)."""
    rows = []
    for e in examples:
        src = _ids(tok, e.source, max_length, truncate, e.where, False)
        rows.append({"input_ids": torch.tensor(src), "attention_mask": torch.ones(len(src), dtype=torch.long),
                     "labels": torch.tensor(_ids(tok, e.target, max_length, truncate, e.where, True))})
    return rows


def collate(rows: list, pad_id: int) -> dict:
    """Sources right-padded to the longest (attention_mask 0), targets to theirs (labels ignored)."""
    def pad(key, value):
        n = max(r[key].numel() for r in rows)
        return torch.stack([torch.nn.functional.pad(r[key], (0, n - r[key].numel()), value=value) for r in rows])

    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE)}


class Seq2Seq(Task):
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    token_accuracy = True
    aligned = True

    def check_model(self, config, path):
        if not getattr(config, "is_encoder_decoder", False):
            from .causal_lm import encoder_kind

            kind = encoder_kind(config)
            fits = ("token-classification, sequence-classification or masked-lm" if kind == "an encoder"
                    else "causal-lm")
            raise ConfigError(f"task='seq2seq' is not allowed: {path} ({config.model_type}) is not an encoder-decoder; "
                              f"use --task {fits}")

    def corpus(self, paths) -> list:
        return [text for e in read_examples(paths) for text in (e.source, e.target)]

    def rows(self, cfg, tok, dist):
        examples = read_examples(cfg.train_files)
        if cfg.eval_files:
            held = read_examples(cfg.eval_files)
        else:
            examples, held = data.split(examples, cfg.eval_fraction, cfg.seed)
        train_rows = rows_of(examples, tok, cfg.max_length, cfg.truncate)
        if len(train_rows) < cfg.batch_size * dist.world:
            raise DataError(f"{cfg.train_files[0]}: {len(train_rows)} training examples, fewer than one global batch "
                            f"(batch_size {cfg.batch_size} x {dist.world} processes)")
        return train_rows, rows_of(held, tok, cfg.max_length, cfg.truncate), "seq2seq (source -> target)"

    def held_out(self, cfg, tok):
        return rows_of(read_examples(cfg.eval_files), tok, cfg.max_length, cfg.truncate)

    def collate(self, rows, pad_id):
        return collate(rows, pad_id)

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["input_ids"].numel() + batch["labels"].numel())

    def evaluate(self, model, rows, tok, cfg, device, dist):
        """Token-weighted loss, perplexity and accuracy over the target tokens (summed over processes as
        causal-lm's are)."""
        from ..evaluate import loss_metrics

        return loss_metrics(model, rows, tok.pad_token_id, cfg.batch_size, device, dist, collate_fn=collate,
                            aligned=self.aligned)

    def evaluate_generating(self, model, tok, cfg, device, generate: int, max_new_tokens: int,
                            batch_size: int) -> tuple[dict, list]:
        """evaluate() on cfg.eval_files, and BLEU, ROUGE (slot accuracy when the records are data-to-text) of
        what the model generates for the first `generate` sources, greedy: (metrics, examples); `fastnlg eval`
        and the T5 demo."""
        from ..evaluate import generation_metrics

        examples = read_examples(cfg.eval_files)
        metrics = self.evaluate(model, rows_of(examples, tok, cfg.max_length, cfg.truncate), tok, cfg, device, None)
        if generate <= 0:
            return metrics, []
        chosen = examples[:generate]
        records = [e.fields for e in chosen]
        gen, shown = generation_metrics(model, tok, [(e.source, e.target) for e in chosen], device,
                                        records=records if all(r is not None for r in records) else None,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size)
        return {**metrics, **gen}, shown

    def summary(self, m):
        return (f"eval loss {m['eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f}, token accuracy "
                f"{m['eval_token_accuracy']:.3f}")
