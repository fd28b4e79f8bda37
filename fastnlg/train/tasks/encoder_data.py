"""The encoder tasks' data: readers (CoNLL, JSONL), the label set, and rows of token ids with their labels.

Token classification:
    CoNLL: one `token ... tag` per line (the tag column is --tag-column, default the last), a blank line
    between sentences, -DOCSTART- lines skipped; any file that is not .jsonl / .json is read as CoNLL.
    JSONL: {"tokens": [...], "tags": [...]}.
    Sub-word alignment as Transformers does it: a word's first sub-token carries its tag, the others -100
    (label_all_tokens=True labels them all).
Sequence classification: JSONL {"text", "label"} or {"text", "text_pair", "label"} (a string or an integer).
Masked LM: JSONL {"text"} or a .txt file, one text per non-empty line.

The label set: cfg.labels if given; else the model's own id2label when it holds real names (not Transformers'
LABEL_0, ...); else the data's labels ("O" first, then by name). A data label outside a fixed set, a tag count
that differs from the token count, a token without a tag and an empty sentence stop with
DataError("<file>:<line>: <problem>") before any training step.
"""
from __future__ import annotations

import re

import torch

from ..data import IGNORE, read_records, text_lines
from ..errors import DataError


def _refuse_unused(record: dict, used: tuple, where: str, task: str) -> None:
    extra = sorted(set(record) - set(used))
    if extra:
        raise DataError(f"{where}: field {extra[0]!r} is not used by --task {task} (its fields: "
                        f"{', '.join(used)})")


def read_conll(path: str, tag_column: int = -1) -> list:
    """-> [(tokens, tags, "file:line" of the sentence's first token)]."""
    sentences, tokens, tags, start = [], [], [], None

    def close():
        nonlocal tokens, tags, start
        if tokens:
            sentences.append((tokens, tags, start))
        tokens, tags, start = [], [], None

    for n, line in text_lines(path):  # (a missing file, or a line that is not UTF-8: a DataError naming it)
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            close()
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: token {parts[0]!r} has no tag (expected 'token ... tag')")
        try:
            tag = parts[tag_column]
        except IndexError:
            raise DataError(f"{path}:{n}: no tag column {tag_column} in {len(parts)} columns") from None
        if start is None:
            start = f"{path}:{n}"
        tokens.append(parts[0])
        tags.append(tag)
    close()
    if not sentences:
        raise DataError(f"{path}: no sentences (CoNLL: one 'token ... tag' per line, blank lines between sentences)")
    return sentences


def read_token_jsonl(path: str) -> list:
    out = []
    for rec, where in read_records(path):
        _refuse_unused(rec, ("tokens", "tags"), where, "token-classification")
        tokens, tags = rec.get("tokens"), rec.get("tags")
        for key, value in (("tokens", tokens), ("tags", tags)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f"{where}: field {key!r} must be a list of strings")
        if not tokens:
            raise DataError(f"{where}: empty sentence (no tokens)")
        if len(tags) != len(tokens):
            raise DataError(f"{where}: {len(tags)} tags for {len(tokens)} tokens")
        out.append((tokens, tags, where))
    return out


def read_token_examples(path: str, tag_column: int = -1) -> list:
    return read_token_jsonl(path) if path.endswith((".jsonl", ".json")) else read_conll(path, tag_column)


def read_sequence_examples(path: str) -> list:
    """-> [(text, text_pair or None, label as a string, where)]."""
    out = []
    for rec, where in read_records(path):
        used = ("text", "text_pair", "label") if "text_pair" in rec else ("text", "label")
        _refuse_unused(rec, used, where, "sequence-classification")
        for key in used:
            if key not in rec:
                raise DataError(f"{where}: missing field {key!r} (records: {{{', '.join(used)}}})")
        texts = [rec["text"]] + ([rec["text_pair"]] if "text_pair" in rec else [])
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError(f"{where}: text fields must be non-empty strings")
        label = rec["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: field 'label' must be a string or an integer, got {type(label).__name__}")
        out.append((texts[0], texts[1] if len(texts) > 1 else None, str(label), where))
    return out


def read_texts(path: str) -> list:
    """-> [(text, where)] for masked LM."""
    out = []
    for rec, where in read_records(path):
        _refuse_unused(rec, ("text",), where, "masked-lm")
        if not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        out.append((rec["text"], where))
    return out


_DEFAULT_NAME = re.compile(r"LABEL_\d+")


def label_set(given: list, model_config, seen: dict) -> tuple[list, str]:
    """-> (label names in id order, where they came from); `seen` maps each data label to where it first
    appears. A data label outside a fixed set is a DataError naming it."""
    id2label = getattr(model_config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)] if id2label else []
    if given:
        labels, source = list(given), "--labels"
    elif names and not all(_DEFAULT_NAME.fullmatch(n) for n in names):
        labels, source = names, "the model's id2label"
    else:
        rest = sorted(set(seen) - {"O"}, key=lambda t: (t.split("-", 1)[-1], t))
        return (["O"] if "O" in seen else []) + rest, "the data"
    if len(set(labels)) != len(labels):
        raise DataError(f"the label set from {source} repeats a label: {labels}")
    for tag, where in seen.items():
        if tag not in labels:
            raise DataError(f"{where}: label {tag!r} is not in the label set from {source} ({', '.join(labels)})")
    return labels, source


def _ids_row(enc, labels) -> dict:
    row = {"input_ids": torch.tensor(enc["input_ids"]), "labels": labels,
           "attention_mask": torch.ones(len(enc["input_ids"]), dtype=torch.long)}
    if "token_type_ids" in enc:
        row["token_type_ids"] = torch.tensor(enc["token_type_ids"])
    return row


def token_rows(examples: list, tok, label2id: dict, max_length: int, label_all_tokens: bool = False) -> list:
    """Rows of sub-word ids whose labels follow their words (first sub-token, or all with label_all_tokens);
    each row keeps its words' tags and which positions start a word, for entity-level evaluation."""
    if not getattr(tok, "is_fast", False):
        raise DataError("token classification needs a fast tokenizer (word_ids); this tokenizer is "
                        f"{type(tok).__name__}")
    rows = []
    for tokens, tags, where in examples:
        enc = tok(tokens, is_split_into_words=True, truncation=True, max_length=max_length)
        labels, previous, kept = [], None, set()
        for word in enc.word_ids():
            if word is None:
                labels.append(IGNORE)
            elif word != previous:
                labels.append(label2id[tags[word]])
                kept.add(word)
            else:
                labels.append(label2id[tags[word]] if label_all_tokens else IGNORE)
            previous = word
        if not kept:
            raise DataError(f"{where}: no token of the sentence is left after tokenisation")
        row = _ids_row(enc, torch.tensor(labels))
        row["first"] = torch.tensor([w is not None and (i == 0 or enc.word_ids()[i - 1] != w)
                                     for i, w in enumerate(enc.word_ids())])
        rows.append(row)
    return rows


def sequence_rows(examples: list, tok, label2id: dict, max_length: int) -> list:
    rows = []
    for text, pair, label, _ in examples:
        enc = tok(text, pair, truncation=True, max_length=max_length)
        rows.append(_ids_row(enc, torch.tensor(label2id[label])))
    return rows


def text_rows(examples: list, tok, max_length: int) -> list:
    return [_ids_row(tok(text, truncation=True, max_length=max_length), None) for text, _ in examples]
