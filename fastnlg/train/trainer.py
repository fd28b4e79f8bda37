"""The fine-tuning loop: a local Transformers causal LM, full / LoRA (PEFT) / BitFit, fastnlg.patch'ed unless
told not to, AdamW with warmup + cosine/linear schedule, clipping, autocast, exact gradient accumulation,
a NaN/Inf guard, evaluation with early stopping, atomic checkpoints and exact resume.

Exact accumulation: a step of `grad_accum` micro-batches counts the target tokens of all of them first
(n_step), and every micro-batch's loss is sum / n_step (`num_items_in_batch`, which the fused loss and HF's
loss both honour), so the summed gradients are those of one batch holding all the micro-batches.

Everything goes to output_dir: config.json, patch_report.txt, metrics.jsonl (one line per logged step and per
evaluation), checkpoint-<step>/ (checkpoint.py), plots (loss.png, lr.png, eval.png) and the final model
(model/ for full and BitFit, adapter/ in PEFT's format for LoRA) with the tokenizer.
"""
from __future__ import annotations

import json
import math
import os
import random
import time

import numpy as np
import torch

from . import checkpoint, data
from .config import TrainConfig
from .evaluate import loss_metrics


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model_and_tokenizer(cfg: TrainConfig, device):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device)
    return model, tok


def prepare_method(model, cfg: TrainConfig):
    """Which Parameters train: all (full), LoRA adapters through PEFT (lora), or the biases (bitfit)."""
    if cfg.method == "lora":
        import peft

        config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_targets if cfg.lora_targets != ["all-linear"] else "all-linear",
                                 task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)
    if cfg.method == "bitfit":
        biases = 0
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
            biases += name.endswith(".bias")
        if not biases:
            raise ValueError("method=bitfit: this model has no bias Parameters to train")
    return model


def lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return f


def make_rows(samples, cfg: TrainConfig, pad_id: int) -> list:
    return data.pack(samples, cfg.max_length, pad_id) if cfg.packing else data.pad_rows(samples, pad_id)


class Batches:
    """Micro-batches in a seeded order per epoch; `position` (epoch, index) is saved in checkpoints."""

    def __init__(self, rows: list, batch_size: int, seed: int, pad_id: int):
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self):
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict) -> None:
        self.epoch, self.index = position["epoch"], position["index"]
        self._order = self._shuffle()

    def next(self) -> dict:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._shuffle()
        picked = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return data.collate([self.rows[i] for i in picked], self.pad_id)


def _autocast(cfg, device):
    if cfg.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def train(cfg: TrainConfig, log=print) -> dict:
    """Runs the configured fine-tuning; returns the last metrics (and eval metrics when evaluated)."""
    cfg.validate()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg, device)
    samples, fmt = data.load_samples(cfg.train_files, tok, cfg.max_length, cfg.truncate)  # DataError before output
    if cfg.eval_files:
        train_samples = samples
        eval_samples, _ = data.load_samples(cfg.eval_files, tok, cfg.max_length, cfg.truncate)
    else:
        train_samples, eval_samples = data.split(samples, cfg.eval_fraction, cfg.seed)
    train_rows = make_rows(train_samples, cfg, tok.pad_token_id)
    eval_rows = data.pad_rows(eval_samples, tok.pad_token_id)

    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        f.write(cfg.to_json())
    model = prepare_method(model, cfg)
    report = None
    if cfg.patch:
        import fastnlg

        report = fastnlg.patch(model)
        with open(os.path.join(cfg.output_dir, "patch_report.txt"), "w") as f:
            f.write(str(report) + "\n")
        log(str(report))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    batches = Batches(train_rows, cfg.batch_size, cfg.seed, tok.pad_token_id)
    state = {"best_eval_loss": None, "evals_without_improvement": 0, "bad_steps": 0, "skipped_steps": 0}
    step = 0
    if cfg.resume:
        last = checkpoint.list_checkpoints(cfg.output_dir)[-1]
        saved = checkpoint.load(last, model, optimizer, scheduler, scaler)
        step = saved["step"]
        batches.restore(saved["data_position"])
        state.update(saved["trainer"])
        log(f"resumed from {last} at step {step}")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    _keep_metrics(metrics_path, step if cfg.resume else 0)  # rows after the checkpoint are run again
    trainable = sum(p.numel() for p in params)
    log(f"training {cfg.method}: {trainable:,} trainable parameters, {len(train_rows)} rows of "
        f"{'packed ' if cfg.packing else ''}{fmt} data, {len(eval_rows)} held out, on {device}")

    def write(record):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint():
        checkpoint.save(cfg.output_dir, step, model, optimizer, scheduler, scaler,
                        {"data_position": batches.position(), "trainer": state}, cfg.keep_checkpoints)

    progress = _progress(cfg, step)
    last = {}
    model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < cfg.max_steps:
        micro = [batches.next() for _ in range(cfg.grad_accum)]
        n_step = sum(data.target_tokens(b) for b in micro)
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            with _autocast(cfg, device):
                out = model(**b, num_items_in_batch=max(n_step, 1), use_cache=False)  # packing needs no cache
            loss = out.loss
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
            tokens_seen += int(b["input_ids"].numel())
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))  # one sync per step
        if finite:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            state["bad_steps"] = 0
        else:
            state["bad_steps"] += 1
            state["skipped_steps"] += 1
            if scaler:
                scaler.update()
            log(f"step {step + 1}: non-finite loss or gradient, optimizer step skipped "
                f"({state['bad_steps']} in a row)")
            if state["bad_steps"] >= cfg.max_bad_steps:
                raise FloatingPointError(f"{cfg.max_bad_steps} non-finite steps in a row at step {step + 1}; "
                                         "lower learning_rate or use fp32 (last good checkpoint kept)")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - t0
            last = {"step": step, "loss": loss_sum.item(), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "peak_memory_mb": _peak_mb(device), "skipped_steps": state["skipped_steps"]}
            write(last)
            progress.update(step, last)
            tokens_seen, t0 = 0, time.perf_counter()
        if eval_rows and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            ev = {"step": step, **loss_metrics(model, eval_rows, tok.pad_token_id, cfg.batch_size, device)}
            write(ev)
            last.update(ev)
            log(f"step {step}: eval loss {ev['eval_loss']:.4f}, perplexity {ev['eval_perplexity']:.2f}, "
                f"token accuracy {ev['eval_token_accuracy']:.3f}")
            best = state["best_eval_loss"]
            if best is None or ev["eval_loss"] < best:
                state["best_eval_loss"], state["evals_without_improvement"] = ev["eval_loss"], 0
            else:
                state["evals_without_improvement"] += 1
            if cfg.early_stopping_patience and state["evals_without_improvement"] >= cfg.early_stopping_patience:
                log(f"early stopping at step {step}: no better eval loss in {cfg.early_stopping_patience} evaluations")
                save_checkpoint()
                break
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint()
    progress.close()
    save_final(model, tok, cfg)
    plot_metrics(metrics_path, cfg.output_dir)
    if report is not None:
        import fastnlg

        fastnlg.unpatch(model)
    return last


def _keep_metrics(path: str, upto: int) -> None:
    """metrics.jsonl without the rows of steps after `upto` (all of them for a fresh run)."""
    if not os.path.exists(path):
        return
    rows = [line for line in open(path) if line.strip() and upto and json.loads(line)["step"] <= upto]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


class _progress:
    def __init__(self, cfg, start):
        self.bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True)
        self.at = start

    def update(self, step, m):
        if self.bar is not None:
            self.bar.update(step - self.at)
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}",
                                 mem_mb=f"{m['peak_memory_mb']:.0f}")
        self.at = step

    def close(self):
        if self.bar is not None:
            self.bar.close()


def save_final(model, tok, cfg: TrainConfig) -> str:
    """adapter/ (PEFT format) for LoRA, model/ (Transformers, safetensors) otherwise; with the tokenizer."""
    path = os.path.join(cfg.output_dir, "adapter" if cfg.method == "lora" else "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
