"""Evaluation of a causal LM on held-out data: loss, perplexity and token accuracy over the target tokens,
and generation metrics on prompt/reference pairs: corpus BLEU (sacrebleu, 13a tokenisation) and ROUGE-1/2/L
F1 (rouge-score, with stemming), with a table of examples saved as markdown and JSONL; and the plots of a
run's metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from .data import IGNORE, collate


def next_token_targets(logits, labels):
    """A causal LM's next-token logits (B, T-1, V), their targets (B, T-1) and which targets count, from its
    logits and labels (B, T); prompt tuning puts virtual tokens in front of the logits."""
    target = labels[:, 1:].to(logits.device)
    return logits[:, logits.shape[1] - labels.shape[1]:-1], target, target != IGNORE


def targets(logits, labels, aligned: bool = False):
    """(logits, targets, which targets count): a causal LM's next tokens (next_token_targets), or with `aligned`
    a seq2seq model's labels as they are (its logits line up with them)."""
    if not aligned:
        return next_token_targets(logits, labels)
    labels = labels.to(logits.device)
    return logits, labels, labels != IGNORE


def token_hits(logits, labels, aligned: bool = False) -> torch.Tensor:
    """[argmax == target, counted targets] of targets(logits, labels, aligned)."""
    logits, target, keep = targets(logits, labels, aligned)
    return torch.stack([((logits.argmax(-1) == target) & keep).sum(), keep.sum()])


@torch.no_grad()
def loss_metrics(model, rows: list, pad_id: int, batch_size: int, device, dist=None, *, collate_fn=collate,
                 aligned: bool = False) -> dict:
    """Token-weighted loss, perplexity = exp(loss) and top-1 accuracy over every target token (the next
    tokens of a causal LM; with `aligned`, a seq2seq model's labels as they are: it gets them to make its
    decoder inputs). Under torchrun each process takes every world-th row (the same number of batches on
    each, padded with rows that count nothing, so FSDP's collectives line up) and the sums are added over
    processes."""
    was_training = model.training
    model.eval()
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    mine = rows[rank::world]
    per_rank = -(-len(rows) // world)
    if len(mine) < per_rank:
        mine = mine + [{**rows[0], "labels": torch.full_like(rows[0]["labels"], IGNORE)}] * (per_rank - len(mine))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate_fn(mine[i:i + batch_size], pad_id).items()}
        # (a seq2seq model gets the labels: it makes its decoder inputs from them)
        inputs = batch if aligned else {k: v for k, v in batch.items() if k != "labels"}
        logits, target, keep = targets(model(**inputs, use_cache=False).logits, batch["labels"], aligned)
        logits = logits.float()
        sums[0] += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        sums[1] += (logits.argmax(-1)[keep] == target[keep]).sum()
        sums[2] += keep.sum()
    if dist is not None:
        dist.all_sum(sums)
    model.train(was_training)
    total, correct, count = sums.tolist()
    if count == 0:
        raise ValueError("evaluation data has no target tokens")
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_token_accuracy": correct / count,
            "eval_tokens": int(count)}


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens=64, batch_size=8, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, num_beams=1, device="cpu") -> tuple[list, dict]:
    """Completions of the prompts (batched, left-padded; an encoder-decoder's sources right-padded, as it
    trained) and {"tokens_per_s", "new_tokens"}."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if seq2seq else "left"
    outputs, new_tokens, start = [], 0, time.perf_counter()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            kw = {"do_sample": do_sample, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
            if do_sample:
                kw.update(temperature=temperature, top_k=top_k, top_p=top_p)
            out = model.generate(**enc, **kw)  # a decoder-only model's prompt, an encoder-decoder's start token:
            out = out[:, 1 if seq2seq else enc["input_ids"].shape[1]:]
            for row in out:
                row = row.tolist()
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                new_tokens += len(row)
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    elapsed = time.perf_counter() - start
    return outputs, {"tokens_per_s": new_tokens / max(elapsed, 1e-9), "new_tokens": new_tokens}


def bleu(hypotheses: list, references: list) -> float:
    """Corpus BLEU (0-100), sacrebleu's defaults (13a tokenisation, exponential smoothing off)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge(hypotheses: list, references: list) -> dict:
    """Mean ROUGE-1/2/L F1 (0-100) over the pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hypotheses, references):
        for k, v in scorer.score(r, h).items():
            sums[k] += v.fmeasure
    n = max(len(hypotheses), 1)
    return {k: 100 * v / n for k, v in sums.items()}


def slot_accuracy(records: list, outputs: list) -> dict:
    """Data-to-text fidelity: the share (0-100) of the records' field values that the outputs state verbatim
    (case-insensitive, as whole words/numbers: "4" is not found in "14" or "-4"), over all fields and per field.
    BLEU and ROUGE reward fluent text that names the wrong city; this does not."""
    import re

    hits, counts = {}, {}
    for record, out in zip(records, outputs):
        for key, value in record.items():
            pattern = r"(?<![\w-])" + re.escape(str(value)) + r"(?![\w])"
            counts[key] = counts.get(key, 0) + 1
            hits[key] = hits.get(key, 0) + bool(re.search(pattern, out, flags=re.IGNORECASE))
    total = sum(counts.values())
    return {"slot_accuracy": 100 * sum(hits.values()) / total if total else float("nan"),
            "slot_accuracy_by_field": {k: 100 * hits[k] / counts[k] for k in counts}}


def generation_metrics(model, tokenizer, pairs: list, device, records: list | None = None,
                       **gen) -> tuple[dict, list]:
    """pairs [(prompt, reference)] -> ({bleu, rouge1, rouge2, rougeL, gen_tokens_per_s[, slot_accuracy,
    slot_accuracy_by_field]}, examples); `records`: the data-to-text input records of the pairs."""
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    outs, speed = generate(model, tokenizer, prompts, device=device, **gen)
    metrics = {"bleu": bleu(outs, refs), **rouge(outs, refs), "gen_tokens_per_s": speed["tokens_per_s"]}
    if records is not None:
        metrics.update(slot_accuracy(records, outs))
    return metrics, [{"input": p, "reference": r, "output": o} for p, r, o in zip(prompts, refs, outs)]


def save_examples(examples: list, stem: str) -> None:
    """`stem`.jsonl and `stem`.md (a table: input, reference, output)."""
    with open(stem + ".jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")

    def cell(text):
        return text.replace("|", "\\|").replace("\n", "<br>")

    with open(stem + ".md", "w") as f:
        f.write("| input | reference | output |\n|---|---|---|\n")
        for e in examples:
            f.write(f"| {cell(e['input'])} | {cell(e['reference'])} | {cell(e['output'])} |\n")


def plot_metrics(metrics_path: str, out_dir: str) -> list:
    """loss.png, lr.png and (when evaluated) eval.png from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return []
    rows = [json.loads(line) for line in open(metrics_path)]
    made = []
    for name, key, label in (("loss", "loss", "training loss"), ("lr", "lr", "learning rate"),
                             ("eval", "eval_loss", "eval loss")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made
