"""Token classification (NER) and sequence classification: an encoder (BERT, RoBERTa, DistilBERT, ModernBERT,
...) with its classification head, trained on the cross-entropy of the labelled tokens (or examples) and
evaluated with the field's metrics: entity-level precision / recall / F1 per type and micro / macro (seqeval,
on the words' first sub-tokens) with token accuracy; accuracy, macro-F1 and a per-class report
(scikit-learn)."""
from __future__ import annotations

import torch

from .. import data
from ..errors import ConfigError, DataError
from . import Task, encoder_data, metrics

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


class _Classifier(Task):
    mapping = ""  # transformers' MODEL_FOR_..._MAPPING_NAMES of the task

    def check_model(self, config, path):
        from transformers.models.auto import modeling_auto

        if config.model_type not in getattr(modeling_auto, self.mapping):
            fits = "masked-lm or causal-lm" if config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES \
                else "causal-lm"
            raise ConfigError(f"task={self.name!r} is not allowed: {path} ({config.model_type}) has no "
                              f"{self.auto_class.removeprefix('AutoModelFor')} head in Transformers; use --task {fits}")

    def _read(self, paths, cfg) -> list:
        raise NotImplementedError

    def encode(self, examples, tok, label2id, cfg) -> list:
        raise NotImplementedError

    def _labels_seen(self, examples) -> dict:
        raise NotImplementedError

    def load_kwargs(self, cfg, tok, model_config):
        self.train_examples = [e for p in cfg.train_files for e in self._read(p, cfg)]
        self.eval_examples = [e for p in cfg.eval_files for e in self._read(p, cfg)]
        seen = self._labels_seen(self.train_examples + self.eval_examples)
        self.labels, self.label_source = encoder_data.label_set(cfg.labels, model_config, seen)
        label2id = {n: i for i, n in enumerate(self.labels)}
        kwargs = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)), "label2id": label2id}
        old = getattr(model_config, "id2label", None) or {}
        if [old[i] for i in sorted(old)] != self.labels:
            kwargs["ignore_mismatched_sizes"] = True  # a new head for this label set
        return kwargs

    def configure(self, model, cfg):
        """cfg.class_weights, one per label in label order, as the patched loss's class weights."""
        if not cfg.class_weights:
            return
        if len(cfg.class_weights) != len(self.labels):
            raise ConfigError(f"class_weights={cfg.class_weights!r} is not allowed: one weight per label, "
                              f"{len(self.labels)} ({', '.join(self.labels)})")
        model.loss_class_weight = torch.tensor([float(w) for w in cfg.class_weights])

    def rows(self, cfg, tok, dist):
        label2id = {n: i for i, n in enumerate(self.labels)}
        train, held = self.train_examples, self.eval_examples
        if not held:
            train, held = data.split(train, cfg.eval_fraction, cfg.seed)
        train_rows, eval_rows = self.encode(train, tok, label2id, cfg), self.encode(held, tok, label2id, cfg)
        if len(train_rows) < cfg.batch_size * dist.world:
            raise DataError(f"{cfg.train_files[0]}: {len(train_rows)} training examples, fewer than one global batch "
                            f"(batch_size {cfg.batch_size} x {dist.world} processes)")
        return train_rows, eval_rows, f"{self.name} ({len(self.labels)} labels from {self.label_source})"

    def held_out(self, cfg, tok):
        return self.encode(self.eval_examples, tok, {n: i for i, n in enumerate(self.labels)}, cfg)

    def collate(self, rows, pad_id):
        return data.collate([{k: r[k] for k in MODEL_KEYS if k in r} for r in rows], pad_id)

    def _predict(self, model, rows, cfg, device, pad_id):
        """-> (summed loss x targets, targets, [(gold ids, predicted ids) per row over its counted positions])."""
        loss_sum, count, pairs = 0.0, 0, []
        for chunk, batch, out in self.eval_batches(model, rows, lambda c: self.collate(c, pad_id), cfg.batch_size,
                                                   device):
            n = int(self.local_count(batch))
            loss_sum += float(out.loss) * n
            count += n
            pred = out.logits.argmax(-1).cpu()
            pairs += [self._pair(r, pred[j]) for j, r in enumerate(chunk)]
        return loss_sum, count, pairs


class TokenClassification(_Classifier):
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    mapping = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
    peft_task_type = "TOKEN_CLS"

    def _read(self, path, cfg):
        return encoder_data.read_token_examples(path, cfg.tag_column)

    def _labels_seen(self, examples):
        seen = {}
        for _, tags, where in examples:
            for tag in tags:
                seen.setdefault(tag, where)
        return seen

    def encode(self, examples, tok, label2id, cfg):
        """Rows of `examples` (as read) under the label ids `label2id`."""
        return encoder_data.token_rows(examples, tok, label2id, cfg.max_length, cfg.label_all_tokens)

    def _pair(self, row, pred):
        first = row["first"]
        return row["labels"][first].tolist(), pred[:len(first)][first].tolist()

    def evaluate(self, model, rows, tok, cfg, device, dist):
        loss_sum, count, pairs = self._predict(model, rows, cfg, device, tok.pad_token_id)
        names = self.labels
        gold = [[names[i] for i in g] for g, _ in pairs]
        pred = [[names[i] for i in p] for _, p in pairs]
        return {"eval_loss": loss_sum / max(count, 1), **metrics.entity_metrics(gold, pred)}

    def summary(self, m):
        return (f"eval loss {m['eval_loss']:.4f}, entity F1 {m['eval_f1']:.3f} (P {m['eval_precision']:.3f}, "
                f"R {m['eval_recall']:.3f}), token accuracy {m['eval_token_accuracy']:.3f}")

    def report(self, m):
        return metrics.report_table("Entities (seqeval, entity level)", m["eval_per_type"], m)

    @torch.no_grad()
    def predict(self, model, tok, text: str, device) -> list:
        """The entities of `text`: [(type, start, end, text, mean probability of its words' tags)], BIO spans
        over the words (a word's tag is its first sub-token's)."""
        enc = tok(text, return_offsets_mapping=True, return_tensors="pt", truncation=True)
        offsets = enc.pop("offset_mapping")[0].tolist()
        words = enc.word_ids()
        probs = model(**{k: v.to(device) for k, v in enc.items()}).logits[0].float().softmax(-1).cpu()
        id2label = model.config.id2label
        tagged, previous = [], None  # (tag, prob, start, end) per word
        for i, w in enumerate(words):
            if w is None:
                continue
            if w != previous:
                p, k = probs[i].max(-1)
                tagged.append([id2label[int(k)], float(p), offsets[i][0], offsets[i][1]])
            else:
                tagged[-1][3] = offsets[i][1]
            previous = w
        entities, current = [], None
        for tag, p, start, end in tagged:
            kind = tag.split("-", 1)[-1] if tag != "O" else None
            if current and kind == current[0] and tag.startswith("I-"):
                current[2], current[4] = end, current[4] + [p]
                continue
            if current:
                entities.append(current)
            current = [kind, start, end, None, [p]] if kind else None
        if current:
            entities.append(current)
        return [(k, s, e, text[s:e], sum(ps) / len(ps)) for k, s, e, _, ps in entities]


class SequenceClassification(_Classifier):
    name = "sequence-classification"
    auto_class = "AutoModelForSequenceClassification"
    mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    peft_task_type = "SEQ_CLS"

    def _read(self, path, cfg):
        return encoder_data.read_sequence_examples(path)

    def _labels_seen(self, examples):
        seen = {}
        for *_, label, where in examples:
            seen.setdefault(label, where)
        return seen

    def encode(self, examples, tok, label2id, cfg):
        return encoder_data.sequence_rows(examples, tok, label2id, cfg.max_length)

    def local_count(self, batch):
        return torch.tensor(batch["labels"].numel(), device=batch["labels"].device)

    def count(self, rows):
        return len(rows)

    def _pair(self, row, pred):
        return [int(row["labels"])], [int(pred)]

    def evaluate(self, model, rows, tok, cfg, device, dist):
        loss_sum, count, pairs = self._predict(model, rows, cfg, device, tok.pad_token_id)
        gold = [self.labels[g[0]] for g, _ in pairs]
        pred = [self.labels[p[0]] for _, p in pairs]
        return {"eval_loss": loss_sum / max(count, 1), **metrics.class_metrics(gold, pred, self.labels)}

    def summary(self, m):
        return f"eval loss {m['eval_loss']:.4f}, accuracy {m['eval_accuracy']:.3f}, macro-F1 {m['eval_macro_f1']:.3f}"

    def report(self, m):
        return metrics.report_table("Classes", m["eval_per_class"], m)

    @torch.no_grad()
    def predict(self, model, tok, text: str, device) -> list:
        """[(label, probability)] of `text`, most probable first."""
        enc = tok(text, return_tensors="pt", truncation=True)
        probs = model(**{k: v.to(device) for k, v in enc.items()}).logits[0].float().softmax(-1).cpu()
        order = probs.argsort(descending=True).tolist()
        return [(model.config.id2label[i], float(probs[i])) for i in order]
