"""Fine-tuning data: JSONL / text files -> token ids with per-token loss masks -> (packed) training rows.

Record formats (one JSON object per line; the format is taken from the first record and every record must
have the same fields):
    {"text": "..."}                                  loss on every token
    {"prompt": "...", "completion": "..."}           loss on the completion (and EOS) only
    {"messages": [{"role": ..., "content": ...}]}    the tokenizer's chat template; loss on assistant turns
    {"input": {field: value, ...}, "output": "..."}  data-to-text: the record is rendered by DATA_TO_TEXT_PROMPT
                                                     as the prompt, the output is the completion
A `.txt` file is one {"text"} sample per non-empty line.

Every problem stops with `DataError("<file>:<line>: <problem>")` before any training step.

Packing: samples are laid end to end in rows of `max_length` tokens. Each sample's position ids restart at
0, which is how Transformers keeps attention inside a sample when no attention mask and no KV cache are
passed (forward with use_cache=False: with a cache it reads one long sequence); the first token of every
sample has label -100, so it is never predicted from the previous sample.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

from .errors import DataError

IGNORE = -100
DATA_TO_TEXT_PROMPT = "Record: {fields}\nText:"  # fields: "key: value | key: value" in the record's order
FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
           "data_to_text": ("input", "output")}


@dataclass
class Sample:
    ids: list
    labels: list  # IGNORE where no loss
    where: str  # "file:line"


def text_lines(path: str):
    """(line number, line without its end) of a UTF-8 text file (a UTF-8 byte-order mark is allowed). A line that
    is not UTF-8 is a DataError naming the file, the line and the byte (UTF-16 files are named as such)."""
    try:
        f = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{path}: no such file") from None
    with f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{path}:1: UTF-16 text (its byte-order mark); save the file as UTF-8")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "save the file as UTF-8") from None
            yield n, line.rstrip("\n").removesuffix("\r")


def read_records(path: str) -> list:
    """-> [(record dict, "file:line")]; JSONL (.jsonl/.json) or plain text (.txt, one sample per line)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records = []
    for n, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.endswith(".txt"):
            records.append(({"text": line}, where))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        records.append((rec, where))
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records


# fields the encoder tasks read: under causal-lm such a record means the wrong task (train/tasks)
OTHER_TASKS = {"label": "sequence-classification", "text_pair": "sequence-classification",
               "tags": "token-classification", "tokens": "token-classification"}


def detect_format(record: dict, where: str) -> str:
    """The record's format; a field no format uses is refused with its name (it would be dropped silently)."""
    for name, fields in FORMATS.items():
        if all(k in record for k in fields):
            extra = sorted(set(record) - set(fields))
            if extra:
                other = OTHER_TASKS.get(extra[0])
                raise DataError(f"{where}: field {extra[0]!r} is not used by --task causal-lm ({name} records: "
                                f"{{{', '.join(fields)}}})" + (f"; it is a {other} field: --task {other}" if other else ""))
            return name
    raise DataError(f"{where}: cannot tell the record format from its fields {sorted(record)}; expected one of "
                    + ", ".join("{" + ", ".join(f) + "}" for f in FORMATS.values()))


def _string(record, key, where, allow_empty=False):
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def render_data_to_text(fields: dict) -> str:
    return DATA_TO_TEXT_PROMPT.format(fields=" | ".join(f"{k}: {v}" for k, v in fields.items()))


def prompt_of(record: dict, fmt: str, where: str) -> tuple[str, str]:
    """(prompt, reference) of a prompt/completion or data-to-text record (for evaluation and generation)."""
    if fmt == "prompt_completion":
        return _string(record, "prompt", where, allow_empty=True), _string(record, "completion", where)
    if fmt == "data_to_text":
        if not isinstance(record["input"], dict) or not record["input"]:
            raise DataError(f"{where}: field 'input' must be a non-empty object of fields")
        return render_data_to_text(record["input"]), _string(record, "output", where)
    raise DataError(f"{where}: a {fmt} record has no prompt/reference split")


def _chat(record, tokenizer, where):
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant turn (nothing to learn)")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat records need a tokenizer with a chat template; this tokenizer has none")
    ids, labels, done = [], [], 0
    for k, m in enumerate(messages):  # each turn's tokens = template(turns <= k) minus template(turns < k)
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=False)
        upto = list(upto["input_ids"] if isinstance(upto, dict) else upto)
        if upto[:done] != ids:
            raise DataError(f"{where}: the chat template is not prefix-stable; cannot mask turns")
        new = upto[done:]
        ids += new
        labels += new if m["role"] == "assistant" else [IGNORE] * len(new)
        done = len(ids)
    return ids, labels


def tokenize(record: dict, fmt: str, tokenizer, where: str) -> Sample:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = tokenizer(_string(record, "text", where), add_special_tokens=True)["input_ids"] + eos
        return Sample(ids, list(ids), where)
    if fmt == "chat":
        return Sample(*_chat(record, tokenizer, where), where)
    prompt, completion = prompt_of(record, fmt, where)
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(" " + completion.strip(), add_special_tokens=False)["input_ids"] + eos
    return Sample(p + c, [IGNORE] * len(p) + c, where)


def corpus(paths) -> list:
    """The text of every record of the files (what a tokenizer trained on this data should cover): text,
    prompt + completion, the rendered record + output, or every chat turn's content."""
    texts = []
    for path in ([paths] if isinstance(paths, str) else paths):
        for record, where in read_records(path):
            fmt = detect_format(record, where)
            if fmt == "text":
                texts.append(_string(record, "text", where))
            elif fmt == "chat":
                texts += [m.get("content", "") for m in record["messages"] if isinstance(m, dict)
                          and isinstance(m.get("content"), str)]
            else:
                texts.append(" ".join(prompt_of(record, fmt, where)))
    return texts


def load_samples(paths, tokenizer, max_length: int, truncate: bool = True) -> tuple[list, str]:
    """All records of the files as Samples (checked, tokenised, truncated or refused) and their format."""
    samples, fmt = [], None
    for path in ([paths] if isinstance(paths, str) else paths):
        for record, where in read_records(path):
            this = detect_format(record, where)
            fmt = fmt or this
            if this != fmt:
                raise DataError(f"{where}: a {this} record in a {fmt} data set (formats cannot be mixed)")
            s = tokenize(record, fmt, tokenizer, where)
            if len(s.ids) > max_length:
                if not truncate:
                    raise DataError(f"{where}: {len(s.ids)} tokens > max_length {max_length} (truncation is off)")
                s.ids, s.labels = s.ids[:max_length], s.labels[:max_length]
            if all(label == IGNORE for label in s.labels[1:]):
                raise DataError(f"{where}: no target tokens left (empty completion, or truncated away)")
            samples.append(s)
    return samples, fmt


def split(samples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A held-out fraction (at least one sample when the fraction is > 0), chosen by a seeded shuffle."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(samples))) if eval_fraction > 0 else 0
    if n_eval >= len(samples):
        raise DataError(f"{len(samples)} samples are too few to hold out {eval_fraction:.0%} for evaluation")
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def pack(samples: list, max_length: int, pad_id: int) -> list:
    """Rows {"input_ids", "labels", "position_ids"} of exactly max_length tokens, samples in order, each
    sample's positions restarting at 0 and its first label ignored; the tail is padding (ignored labels)."""
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": []}

    def close():
        pad = max_length - len(cur["input_ids"])
        cur["input_ids"] += [pad_id] * pad
        cur["labels"] += [IGNORE] * pad
        cur["position_ids"] += list(range(pad))
        rows.append({k: torch.tensor(v) for k, v in cur.items()})

    for s in samples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(s.ids) > max_length:
            close()
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += s.ids
        cur["labels"] += [IGNORE] + s.labels[1:]
        cur["position_ids"] += list(range(len(s.ids)))
    if cur["input_ids"]:
        close()
    return rows


def pad_rows(samples: list, pad_id: int) -> list:
    """Unpacked rows: one sample each, right-padded to the longest in the batch by `collate`."""
    return [{"input_ids": torch.tensor(s.ids), "labels": torch.tensor([IGNORE] + s.labels[1:]),
             "attention_mask": torch.ones(len(s.ids), dtype=torch.long)} for s in samples]


def collate(rows: list, pad_id: int) -> dict:
    """Stacks rows into a batch, right-padding unpacked rows (attention_mask 0, labels ignored); 0-dim values
    (a sequence's class label) are stacked as they are."""
    T = max(r["input_ids"].numel() for r in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0, "position_ids": 0, "token_type_ids": 0}
    out = {}
    for key in rows[0]:
        if rows[0][key].dim() == 0:
            out[key] = torch.stack([r[key] for r in rows])
            continue
        out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, T - r[key].numel()), value=fill[key])
                                for r in rows])
    return out


def target_tokens(batch: dict) -> int:
    """Tokens the loss counts after the causal shift (labels[..., 1:] not ignored) in a batch (B, T) or one
    row (T,)."""
    return int((batch["labels"][..., 1:] != IGNORE).sum())
