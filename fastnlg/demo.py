"""The embedded demo: a data-to-text task (weather records -> one or two sentences), a small Llama-style model
and a byte-level BPE tokenizer trained on the data, all made here (no download), then

    1. pre-training from scratch on the text side (the reports alone) - the base model;
    2. LoRA fine-tuning of that base on the task (record -> report), fastnlg.patch'ed;
    3. the same fine-tuning with --no-patch, for its own tokens/s and peak memory;
    4. perplexity, BLEU and ROUGE-L on the held-out records before and after fine-tuning, example generations,
       the patched against the unpatched LoRA step timed side by side (the two models' steps alternated on the
       same batches in one process: benchmarks/side_by_side.py), and report.md with all of it.
Each training run is a `fastnlg train` subprocess, so its peak memory is its own.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

CITIES = ["Oslo", "Lisbon", "Nairobi", "Lima", "Osaka", "Denver", "Perth", "Tunis", "Quito", "Hanoi", "Bergen",
          "Porto", "Austin", "Cairo", "Seoul", "Dublin", "Zagreb", "Hobart", "Leeds", "Recife"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SKIES = ["sunny", "cloudy", "rainy", "foggy", "snowy", "windy", "stormy", "clear"]
WINDS = ["calm", "light", "moderate", "strong"]
OPENERS = [
    "{city} will be {sky} on {day}, with a high of {high} degrees and a low of {low}.",
    "On {day}, expect {sky} weather in {city}: highs near {high} and lows around {low} degrees.",
    "{day} in {city} looks {sky}, reaching {high} degrees and dropping to {low} overnight.",
    "Temperatures in {city} on {day} range from {low} to {high} degrees under {sky} skies.",
]
EXTRAS = {
    "wind": ["Winds will be {wind}.", "Expect {wind} winds.", "The wind stays {wind}."],
    "rain": ["The chance of rain is {rain} percent.", "There is a {rain} percent chance of rain."],
}
SIZES = {  # examples, model (hidden, layers, heads, intermediate), steps (pretrain, finetune), batch, tokens
    "quick": dict(examples=600, hidden=64, layers=2, heads=4, inter=172, vocab=400, pre_steps=300, ft_steps=150,
                  batch=16, max_length=128, eval_records=24, rounds=15),
    "default": dict(examples=3000, hidden=128, layers=4, heads=4, inter=344, vocab=800, pre_steps=1000,
                    ft_steps=400, batch=16, max_length=128, eval_records=64, rounds=20),
    "gpu": dict(examples=20000, hidden=512, layers=8, heads=8, inter=1376, vocab=2000, pre_steps=1000,
                ft_steps=600, batch=32, max_length=256, eval_records=200, rounds=30),
}


def _report(rec: dict, rng) -> str:
    text = rng.choice(OPENERS).format(**rec)
    for key in ("wind", "rain"):
        if key in rec:
            text += " " + rng.choice(EXTRAS[key]).format(**rec)
    return text


def make_records(n: int, seed: int = 0) -> list:
    """n weather records with their reports: several paraphrases per part, optional wind and rain fields;
    "paraphrase" is a second report of the same record in other words (for the text-side pre-training)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        high = rng.randint(-5, 38)
        rec = {"city": rng.choice(CITIES), "day": rng.choice(DAYS), "sky": rng.choice(SKIES), "high": high,
               "low": high - rng.randint(3, 14)}
        if rng.random() < 0.5:
            rec["wind"] = rng.choice(WINDS)
        if rng.random() < 0.4:
            rec["rain"] = rng.choice(range(10, 100, 10))
        out.append({"input": rec, "output": _report(rec, rng), "paraphrase": _report(rec, rng)})
    return out


def preference_pairs(records: list, seed: int = 0) -> list:
    """{"prompt", "chosen", "rejected"} pairs of the data-to-text task: the report of the record against a report
    that changes one of its fields (another city, sky or day, a high a few degrees off) or drops the optional
    wind / rain it has; the rejected report is worded like the chosen one where it can be."""
    from .train.data import render_data_to_text

    rng = random.Random(seed)
    out = []
    for r in records:
        rec = r["input"]
        wrong = dict(rec)
        kind = rng.choice(["city", "sky", "day", "high"] + [k for k in ("wind", "rain") if k in rec])
        if kind in ("wind", "rain"):
            del wrong[kind]
        elif kind == "high":
            wrong["high"] = rec["high"] + rng.choice([-7, -5, -3, 3, 5, 7])
            wrong["low"] = min(rec["low"], wrong["high"] - 3)
        else:
            pool = {"city": CITIES, "sky": SKIES, "day": DAYS}[kind]
            wrong[kind] = rng.choice([v for v in pool if v != rec[kind]])
        state = rng.getstate()
        chosen = _report(rec, rng)
        rng.setstate(state)  # the same wording for the rejected report
        rejected = _report(wrong, rng)
        if rejected != chosen:
            out.append({"prompt": render_data_to_text(rec), "chosen": chosen, "rejected": rejected})
    return out


def write_data(folder: str, size: dict, seed: int = 0) -> dict:
    """train.jsonl / eval.jsonl (data-to-text) and text.jsonl (text only, for pre-training: each line a
    training report followed by a paraphrase of it - plain text in which later words repeat earlier ones,
    as real text does; no record appears in it)."""
    os.makedirs(folder, exist_ok=True)
    recs = make_records(size["examples"], seed)
    n_eval = max(size["eval_records"], size["examples"] // 20)
    paths = {"train": os.path.join(folder, "train.jsonl"), "eval": os.path.join(folder, "eval.jsonl"),
             "text": os.path.join(folder, "text.jsonl")}
    pairs = [{"input": r["input"], "output": r["output"]} for r in recs]
    for name, rows in (("train", pairs[n_eval:]), ("eval", pairs[:n_eval]),
                       ("text", [{"text": r["output"] + " " + r["paraphrase"]} for r in recs[n_eval:]])):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


def build_base(folder: str, text_path: str, size: dict) -> str:
    """A byte-level BPE tokenizer trained on the data (and the prompt's words) and a randomly initialised
    Llama-style model of the demo's size, saved (fastnlg.train.builtin, as `--model llama-small` does)."""
    from .train import builtin
    from .train.data import read_records, render_data_to_text

    corpus = [r["text"] for r, _ in read_records(text_path)]
    corpus += [render_data_to_text(r["input"]) for r in make_records(200, seed=1)]  # the prompt's words too
    return builtin.save(folder, builtin.train_tokenizer(corpus, size["vocab"]), size, size["max_length"])


def run_train(out: str, **options) -> dict:
    """`fastnlg train` in a subprocess; its metrics.jsonl rows."""
    args = [sys.executable, "-m", "fastnlg.cli", "train", "--output-dir", out, "--progress", "false"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", ",".join(value) if isinstance(value, list) else str(value)]
    subprocess.run(args, check=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def evaluate(model_dir: str, adapter: str | None, paths: dict, size: dict, device) -> tuple[dict, list]:
    import torch

    from .loading import load_causal_lm, load_tokenizer
    from .train import data
    from .train.evaluate import generation_metrics, loss_metrics

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32, device=device, adapter=adapter)
    samples, _ = data.load_samples(paths["eval"], tok, size["max_length"])
    metrics = loss_metrics(model, data.pad_rows(samples, tok.pad_token_id), tok.pad_token_id, 32, device)
    records = data.read_records(paths["eval"])[:size["eval_records"]]
    pairs = [data.prompt_of(r, "data_to_text", w) for r, w in records]
    gen, examples = generation_metrics(model, tok, pairs, device, records=[r["input"] for r, _ in records],
                                       max_new_tokens=60, batch_size=32)
    return {**metrics, **gen}, examples


def step_ratio(plain, task, rows: list, pad_id: int, device, size: dict, what: str) -> str:
    """`plain` (a model in training mode) against a patched copy of it, their AdamW steps on `rows` (collated by
    `task` into batches of size["batch"] `what`) alternated by benchmarks/side_by_side.py's `compare` for
    size["rounds"] rounds: the median ratio with its p20-p80 spread and verdict, as a line."""
    import copy

    import torch

    from .benchmarks.side_by_side import compare  # benchmarks/ installs as fastnlg.benchmarks
    from .patching import patch

    batches = [{k: v.to(device) for k, v in task.collate(rows[i:i + size["batch"]], pad_id).items()}
               for i in range(0, len(rows), size["batch"])]
    rounds, what = size["rounds"], f"{size['batch']} {what}"
    fused = copy.deepcopy(plain)
    patch(fused)

    def stepper(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        state = {"i": 0}

        def step():
            model(**batches[state["i"] % len(batches)]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["i"] += 1
        return step

    result = compare({"fastnlg": stepper(fused), "unpatched": stepper(plain)}, device=device.type,
                     baseline="unpatched", rounds=rounds)
    ratio = result.ratio("fastnlg")
    return f"{ratio} ({ratio.verdict()}; {what} a step, {result.ms['fastnlg'].median:.0f} ms patched)"


LORA = dict(method="lora", lora_r=16, lora_alpha=32)


def side_by_side(model_dir: str, paths: dict, size: dict, device) -> str:
    """The patched against the unpatched LoRA training step of the fine-tuning, alternated on the same batches:
    the median ratio with its p20-p80 spread."""
    import torch

    from .train import data, tasks
    from .train.config import TrainConfig
    from .train.setup import prepare_method

    cfg = TrainConfig(model=model_dir, train_files=[paths["train"]], max_length=size["max_length"],
                      batch_size=size["batch"], **LORA)
    torch.manual_seed(0)
    task, plain, tok = tasks.load(cfg, device)
    plain = prepare_method(plain, cfg, log=lambda *_: None)
    plain.train()
    samples, _ = data.load_samples(paths["train"], tok, size["max_length"])
    rows = data.pad_rows(samples[:size["batch"] * 4], tok.pad_token_id)
    return step_ratio(plain, task, rows, tok.pad_token_id, device, size, "records")


def _last(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else float("nan")


def _median(rows, key):
    vals = sorted(r[key] for r in rows if key in r)
    return vals[len(vals) // 2] if vals else float("nan")


def _agree_until(a, b, rtol=1e-4):
    """The last logged step up to which the two runs' training losses agree within rtol."""
    last = 0
    for x, y in zip((r for r in a if "loss" in r), (r for r in b if "loss" in r)):
        if abs(x["loss"] - y["loss"]) > rtol * abs(y["loss"]):
            break
        last = x["step"]
    return last


def run(out: str, quick: bool = False, device: str = "auto") -> dict:
    import torch

    from .train.evaluate import plot_metrics, save_examples
    from .train.setup import pick_device

    dev = pick_device(device)
    size = SIZES["quick" if quick else ("gpu" if dev.type == "cuda" else "default")]
    os.makedirs(out, exist_ok=True)
    print(f"fastnlg demo: {'quick' if quick else 'full'} size on {dev} -> {out}")
    paths = write_data(os.path.join(out, "data"), size)
    base = build_base(os.path.join(out, "base"), paths["text"], size)
    common = dict(max_length=size["max_length"], batch_size=size["batch"], device=str(dev), seed=0)
    print(f"1/4 pre-training the base model from scratch on the reports ({size['pre_steps']} steps, full)")
    pre = run_train(os.path.join(out, "pretrain"), model=base, train_files=[paths["text"]], method="full",
                    max_steps=size["pre_steps"], learning_rate=3e-3, warmup_steps=size["pre_steps"] // 10,
                    eval_every=size["pre_steps"], save_every=size["pre_steps"], log_every=10, **common)
    pretrained = os.path.join(out, "pretrain", "model")
    before, _ = evaluate(pretrained, None, paths, size, dev)
    ft = dict(model=pretrained, train_files=[paths["train"]], eval_files=[paths["eval"]], **LORA,
              max_steps=size["ft_steps"], learning_rate=5e-3, warmup_steps=size["ft_steps"] // 10,
              eval_every=max(size["ft_steps"] // 4, 1), save_every=size["ft_steps"], log_every=5, **common)
    print(f"2/4 LoRA fine-tuning on records -> reports ({size['ft_steps']} steps), fastnlg.patch'ed")
    patched = run_train(os.path.join(out, "finetune"), **ft)
    print("3/4 the same fine-tuning without fastnlg (--no-patch), for speed and memory")
    unpatched = run_train(os.path.join(out, "finetune_unpatched"), patch="false", **ft)
    print("4/4 evaluating before and after fine-tuning, and timing the two steps side by side")
    after, examples = evaluate(pretrained, os.path.join(out, "finetune", "adapter"), paths, size, dev)
    ratio = side_by_side(pretrained, paths, size, dev)
    save_examples(examples, os.path.join(out, "examples"))
    plot_metrics(os.path.join(out, "finetune", "metrics.jsonl"), out)
    summary = {"size": "quick" if quick else "full", "device": str(dev), "torch": torch.__version__,
               "pretrain_final_loss": _last(pre, "loss"), "before": before, "after": after,
               "patched": {"tokens_per_s": _median(patched, "tokens_per_s"),
                           "peak_memory_mb": _last(patched, "peak_memory_mb"), "final_loss": _last(patched, "loss")},
               "unpatched": {"tokens_per_s": _median(unpatched, "tokens_per_s"),
                             "peak_memory_mb": _last(unpatched, "peak_memory_mb"),
                             "final_loss": _last(unpatched, "loss")},
               "losses_agree_until_step": _agree_until(patched, unpatched), "side_by_side": ratio}
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(summary) + "\n")
    write_report(out, summary, examples[:5], size)
    print(open(os.path.join(out, "report.md")).read())
    return summary


def write_report(out: str, s: dict, examples: list, size: dict) -> None:
    b, a, p, u = s["before"], s["after"], s["patched"], s["unpatched"]
    mem = "GPU peak allocated" if s["device"].startswith("cuda") else "process peak RSS"
    lines = [
        "# fastnlg demo: weather records -> reports", "",
        f"Size: {s['size']} ({size['examples']} examples, Llama-style model hidden {size['hidden']} x "
        f"{size['layers']} layers, BPE vocabulary {size['vocab']}), device {s['device']}, torch {s['torch']}.",
        "The base model is pre-trained here from scratch on text alone (each document a report and a paraphrase "
        "of it; no records), then fine-tuned with LoRA (r=16) on record -> report pairs. Metrics are on "
        "held-out records; slot accuracy is the share of the record's values the generated text states "
        "verbatim (BLEU and ROUGE also reward fluent text that names the wrong city).", "",
        "| metric | before fine-tuning | after |", "|---|---|---|",
        f"| eval loss | {b['eval_loss']:.3f} | {a['eval_loss']:.3f} |",
        f"| perplexity | {b['eval_perplexity']:.2f} | {a['eval_perplexity']:.2f} |",
        f"| token accuracy | {b['eval_token_accuracy']:.3f} | {a['eval_token_accuracy']:.3f} |",
        f"| BLEU | {b['bleu']:.1f} | {a['bleu']:.1f} |",
        f"| ROUGE-L | {b['rougeL']:.1f} | {a['rougeL']:.1f} |",
        f"| slot accuracy (%) | {b['slot_accuracy']:.0f} | {a['slot_accuracy']:.0f} |"]
    lines += [f"| - {k} | {b['slot_accuracy_by_field'].get(k, float('nan')):.0f} | {v:.0f} |"
              for k, v in a["slot_accuracy_by_field"].items()]
    lines += [
        "", "## fastnlg.patch vs plain Transformers (same LoRA fine-tuning)", "",
        f"Training step, side by side (alternated on the same batches in one process): {s['side_by_side']}.", "",
        f"| run | tokens/s (median of logged steps) | {mem} (MB) | final training loss |", "|---|---|---|---|",
        f"| fastnlg.patch | {p['tokens_per_s']:.0f} | {p['peak_memory_mb']:.0f} | {p['final_loss']:.4f} |",
        f"| --no-patch | {u['tokens_per_s']:.0f} | {u['peak_memory_mb']:.0f} | {u['final_loss']:.4f} |",
        "", "Each run's own figures are above; no speed ratio is taken between them: they ran one after the other, "
        "so their tokens/s also measure the machine's load at the two moments. The side-by-side line is the "
        "comparison.", "", f"The two runs' training losses agree within 1e-4 (relative) up to step {s['losses_agree_until_step']}; "
        "after that the fp32 rounding differences of kernels that sum in another order compound, as between "
        "any two implementations, and the runs follow different (equally valid) trajectories.",
        "", "## Examples (held out)", "", "| record | reference | generated |", "|---|---|---|"]
    lines += [f"| {e['input']} | {e['reference']} | {e['output']} |".replace("\n", " ") for e in examples]
    lines += ["", "Files: data/, base/, pretrain/, finetune/ (adapter/, metrics.jsonl, checkpoints, plots), "
              "finetune_unpatched/, examples.md/.jsonl, loss.png, lr.png, eval.png, metrics.jsonl (this summary)."]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
