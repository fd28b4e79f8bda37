"""`fastnlg demo --model t5`: the demo's data-to-text task (weather records -> reports, fastnlg/demo.py) with an
encoder-decoder, everything made here (no download):

    1. the same generated records; a byte-level BPE tokenizer trained on them and a T5 (v1.1 / Flan-T5
       style: gated-GELU MLP, relative position bias, untied head) initialised at random - the base;
    2. `fastnlg train --task seq2seq` on record -> report (full training, fastnlg.patch'ed), and the same run
       with --no-patch;
    3. loss, BLEU, ROUGE-L and slot accuracy per field on the held-out records before and after, beside the
       decoder-only demo's figures when its run is there (out/demo/metrics.jsonl): the encoder-decoder reads
       the record through cross-attention, the decoder-only model through its prompt;
    4. patched against unpatched speed measured side by side (the two models' steps alternated on the same
       batches in one process: benchmarks/side_by_side.py), each run's own tokens/s and peak memory, and
       report.md.
"""
from __future__ import annotations

import json
import os

from . import demo

SIZES = {  # the T5 (d_model, layers per stack, heads x head dim, MLP), steps, batch, learning rate; the quick
    # size's --no-patch run is shorter (its tokens/s and memory need no full run; the ratio is side by side)
    "quick": dict(examples=600, eval_records=24, hidden=64, layers=2, heads=4, head_dim=16, inter=128, vocab=400,
                  steps=150, unpatched_steps=30, batch=16, lr=1e-2, max_length=96, rounds=5),
    "default": dict(examples=3000, eval_records=64, hidden=128, layers=3, heads=4, head_dim=32, inter=256, vocab=800,
                    steps=500, batch=16, lr=5e-3, max_length=96, rounds=10),
    "gpu": dict(examples=20000, eval_records=200, hidden=512, layers=6, heads=8, head_dim=64, inter=1024, vocab=2000,
                steps=1500, batch=32, lr=1e-3, max_length=128, rounds=15),
}
FIELDS = ("city", "day", "sky", "high", "low", "wind", "rain")


def build_base(folder: str, paths: dict, size: dict) -> str:
    """The tokenizer trained on the records and reports (as `--model t5-tiny` trains its own) and the T5."""
    from .train import builtin
    from .train.tasks.seq2seq import Seq2Seq

    tok = builtin.train_tokenizer(Seq2Seq().corpus([paths["train"]]), size["vocab"])
    model = dict(arch="t5", ff="gated-gelu", tied=False, **{k: size[k] for k in ("hidden", "layers", "heads",
                                                                                 "head_dim", "inter")})
    return builtin.save(folder, tok, model, size["max_length"])


def _cfg(model_dir: str, paths: dict, size: dict, **kw):
    from .train.config import TrainConfig

    return TrainConfig(task="seq2seq", model=model_dir, train_files=[paths["train"]], eval_files=[paths["eval"]],
                       max_length=size["max_length"], batch_size=size["batch"], **kw)


def evaluate(model_dir: str, paths: dict, size: dict, device) -> tuple[dict, list]:
    """Loss, perplexity and token accuracy on the held-out records; BLEU, ROUGE and slot accuracy of what it
    generates for the first eval_records of them (greedy)."""
    from .train import tasks

    cfg = _cfg(model_dir, paths, size)
    task, model, tok = tasks.load(cfg, device)
    return task.evaluate_generating(model, tok, cfg, device, size["eval_records"], max_new_tokens=60, batch_size=32)


def _side_by_side(model_dir: str, paths: dict, size: dict, device) -> str:
    """The patched against the unpatched training step, alternated on the same batches (the median ratio with
    its p20-p80 spread)."""
    from .train import tasks
    from .train.tasks.seq2seq import read_examples, rows_of

    task, plain, tok = tasks.load(_cfg(model_dir, paths, size), device)
    plain.train()
    rows = rows_of(read_examples(paths["train"])[:size["batch"] * 4], tok, size["max_length"])
    return demo.step_ratio(plain, task, rows, tok.pad_token_id, device, size, "records")


def decoder_only_summary(out: str) -> dict | None:
    """The decoder-only demo's summary beside this run's folder (`fastnlg demo` writes out/demo/metrics.jsonl)."""
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "demo", "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def run(out: str, quick: bool = False, device: str = "auto") -> dict:
    import torch

    from .train.evaluate import plot_metrics, save_examples
    from .train.setup import pick_device

    dev = pick_device(device)
    name = "quick" if quick else ("gpu" if dev.type == "cuda" else "default")
    size = SIZES[name]
    os.makedirs(out, exist_ok=True)
    print(f"fastnlg demo --model t5: {'quick' if quick else 'full'} size on {dev} -> {out}")
    paths = demo.write_data(os.path.join(out, "data"), size)
    base = build_base(os.path.join(out, "base"), paths, size)
    print("1/4 the randomly initialised T5 on the held-out records")
    before, _ = evaluate(base, paths, size, dev)
    common = dict(task="seq2seq", model=base, train_files=[paths["train"]], eval_files=[paths["eval"]], method="full",
                  max_steps=size["steps"], learning_rate=size["lr"], warmup_steps=size["steps"] // 10,
                  eval_every=max(size["steps"] // 4, 1), save_every=size["steps"], log_every=5,
                  max_length=size["max_length"], batch_size=size["batch"], device=str(dev), seed=0)
    print(f"2/4 training it on records -> reports ({size['steps']} steps, full), fastnlg.patch'ed")
    patched = demo.run_train(os.path.join(out, "train"), **common)
    n = size.get("unpatched_steps", size["steps"])
    print(f"3/4 the same training without fastnlg (--no-patch{f', its first {n} steps' if n < size['steps'] else ''})")
    unpatched = demo.run_train(os.path.join(out, "train_unpatched"), patch="false",
                               **dict(common, max_steps=n, save_every=n, eval_every=n))
    print("4/4 evaluating, and timing the two steps side by side")
    after, examples = evaluate(os.path.join(out, "train", "model"), paths, size, dev)
    ratio = _side_by_side(base, paths, size, dev)
    save_examples(examples, os.path.join(out, "examples"))
    plot_metrics(os.path.join(out, "train", "metrics.jsonl"), out)
    runs = {n: {"tokens_per_s": demo._median(rows, "tokens_per_s"), "peak_memory_mb": demo._last(rows, "peak_memory_mb"),
                "final_loss": demo._last(rows, "loss")} for n, rows in (("patched", patched), ("unpatched", unpatched))}
    summary = {"size": name, "device": str(dev), "torch": torch.__version__, "before": before, "after": after,
               "side_by_side": ratio, "unpatched_steps": n, **runs}
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(summary) + "\n")
    write_report(out, summary, examples[:5], size, decoder_only_summary(out))
    print(open(os.path.join(out, "report.md")).read())
    return summary


def write_report(out: str, s: dict, examples: list, size: dict, decoder: dict | None) -> None:
    b, a, p, u = s["before"], s["after"], s["patched"], s["unpatched"]
    mem = "GPU peak allocated" if s["device"].startswith("cuda") else "process peak RSS"
    d = decoder["after"] if decoder else None
    short = s["unpatched_steps"] < size["steps"]
    plain = f"--no-patch (its first {s['unpatched_steps']} steps)" if short else "--no-patch"
    head = "| metric | T5 before training | T5 after |" + (" decoder-only demo after fine-tuning |" if d else "")
    rule = "|---|---|---|" + ("---|" if d else "")

    def row(label, key, fmt):
        cells = [fmt.format(b[key]), fmt.format(a[key])] + ([fmt.format(d[key]) if key in d else "-"] if d else [])
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = ["# fastnlg demo --model t5: weather records -> reports with an encoder-decoder", "",
             f"Size: {s['size']} ({size['examples']} examples; T5 d_model {size['hidden']}, {size['layers']} + "
             f"{size['layers']} layers, {size['heads']} heads of {size['head_dim']}, gated-GELU MLP {size['inter']}, "
             f"BPE vocabulary {size['vocab']}), device {s['device']}, torch {s['torch']}. The T5 is trained from "
             f"random weights on record -> report pairs ({size['steps']} steps); the record is the encoder's input "
             "and the decoder reads it through cross-attention. Metrics are on held-out records; slot accuracy is "
             "the share of the record's values the generated text states verbatim.", "", head, rule,
             row("eval loss", "eval_loss", "{:.3f}"), row("token accuracy", "eval_token_accuracy", "{:.3f}"),
             row("BLEU", "bleu", "{:.1f}"), row("ROUGE-L", "rougeL", "{:.1f}"),
             row("slot accuracy (%)", "slot_accuracy", "{:.0f}")]
    for field in FIELDS:
        if field in a["slot_accuracy_by_field"]:
            cells = [f"{b['slot_accuracy_by_field'].get(field, float('nan')):.0f}",
                     f"{a['slot_accuracy_by_field'][field]:.0f}"]
            if d:
                theirs = d.get("slot_accuracy_by_field", {}).get(field)
                cells.append("-" if theirs is None else f"{theirs:.0f}")
            lines.append(f"| - {field} | " + " | ".join(cells) + " |")
    if decoder:
        lines += ["", f"The decoder-only column is `fastnlg demo`'s run at its {decoder.get('size')} size (a Llama-style "
                  "model pre-trained on the reports, then LoRA fine-tuned), from out/demo/metrics.jsonl; its eval "
                  "loss is over its own tokenizer's tokens."]
    else:
        lines += ["", "Run `fastnlg demo` (out/demo) as well to see the decoder-only model's figures beside these."]
    lines += ["", "## fastnlg.patch vs plain Transformers (the same training)", "",
              f"Training step, side by side (alternated on the same batches in one process): {s['side_by_side']}.", "",
              f"| run | tokens/s (median of logged steps) | {mem} (MB) | final training loss |", "|---|---|---|---|",
              f"| fastnlg.patch | {p['tokens_per_s']:.0f} | {p['peak_memory_mb']:.0f} | {p['final_loss']:.4f} |",
              f"| {plain} | {u['tokens_per_s']:.0f} | {u['peak_memory_mb']:.0f} | {u['final_loss']:.4f} |",
              "", "The two runs' own figures come from runs made one after the other, so their ratio would also "
              "measure the machine's load between them; the side-by-side line above is the comparison.",
              "", "## Examples (held out)", "", "| record | reference | generated |", "|---|---|---|"]
    lines += [f"| {e['input']} | {e['reference']} | {e['output']} |".replace("\n", " ") for e in examples]
    lines += ["", "Files: data/, base/, train/ (model/, metrics.jsonl, checkpoints), train_unpatched/, "
              "examples.md/.jsonl, loss.png, lr.png, eval.png, metrics.jsonl (this summary)."]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
