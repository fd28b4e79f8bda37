"""The fine-tuning loop: a local Transformers causal LM (or a built-in config trained from scratch), full
fine-tuning, the PEFT methods (LoRA, QLoRA, prompt/prefix tuning, IA3, AdaLoRA) or BitFit, fastnlg.patch'ed
unless told not to, AdamW (or 8-bit AdamW) with warmup + cosine/linear schedule, clipping, autocast,
gradient checkpointing with optional activation offload, exact gradient accumulation, a NaN/Inf guard,
evaluation with early stopping, atomic checkpoints and exact resume, on one process or several (DDP/FSDP2,
distributed.py).

Host syncs: with fused AdamW (CUDA, no fp16 scaler) a non-finite step is skipped on the device
(`found_inf`) and the guard's counters are read at log steps only, so a step between logs never waits for
the GPU; elsewhere the guard reads one flag per step.

Exact accumulation: a step of `grad_accum` micro-batches counts the target tokens of all of them first
(n_step), and every micro-batch's loss is sum / n_step (`num_items_in_batch`, which the fused loss and HF's
loss both honour), so the summed gradients are those of one batch holding all the micro-batches.

Everything goes to output_dir: config.json, patch_report.txt, metrics.jsonl (one line per logged step: loss,
lr, grad_norm, token_accuracy of the training tokens since the last line (counted inside the fused loss, or
from the logits of an unpatched model), tokens/s, peak memory; and one per evaluation), checkpoint-<step>/
(checkpoint.py), plots (loss.png, lr.png, eval.png) and the final model
(model/ for full and BitFit, adapter/ in PEFT's format for the PEFT methods) with the tokenizer; base/ holds a
built-in config's model as initialised.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time

import numpy as np
import torch

from . import builtin, checkpoint, data
from .config import TrainConfig, resolve_precision
from .distributed import Dist
from .evaluate import loss_metrics, token_hits


def pick_device(name: str) -> torch.device:
    return Dist.single().device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _bnb_cuda(cfg: TrainConfig, device) -> bool:
    """QLoRA on bitsandbytes' NF4 (CUDA with bitsandbytes installed); elsewhere on fastnlg's NF4Linear."""
    from ..loading import bitsandbytes_4bit_available

    return cfg.method == "qlora" and bitsandbytes_4bit_available(device)


def load_model_and_tokenizer(cfg: TrainConfig, device):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return load_model(cfg, device), tok


def load_model(cfg: TrainConfig, device):
    """The causal LM of cfg.model on `device`: 4-bit through bitsandbytes for QLoRA on CUDA, the frozen base
    of the adapter methods in the compute dtype, fp32 otherwise; gradient checkpointing as configured."""
    from ..loading import enable_checkpointing, load_causal_lm

    if _bnb_cuda(cfg, device):
        dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16  # no bf16 on sm_75
        model = load_causal_lm(cfg.model, dtype=dtype, device=device, bnb_4bit=True)
    else:  # the frozen base of an adapter method in the compute dtype (PEFT keeps adapters fp32); else fp32
        frozen_base = cfg.method not in ("full", "bitfit") and cfg.precision != "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision] if frozen_base else torch.float32
        model = load_causal_lm(cfg.model, dtype=dtype, device=device)
    if cfg.gradient_checkpointing:
        # offloading needs the reentrant form: its saved inputs go through the saved-tensor hooks
        enable_checkpointing(model, use_reentrant=cfg.offload_activations)
    return model


def _targets(cfg: TrainConfig):
    return "all-linear" if cfg.lora_targets == ["all-linear"] else cfg.lora_targets


def prepare_method(model, cfg: TrainConfig, log=print):
    """Which Parameters train: all (full); the biases (bitfit); otherwise PEFT's modules for the method, so
    the adapter saves and loads in PEFT's format. QLoRA: LoRA over NF4 base layers (bitsandbytes' when the
    model was loaded 4-bit, else fastnlg's NF4Linear, quantised here after the adapters are attached)."""
    if cfg.method == "full":
        return model
    if cfg.method == "bitfit":
        biases = 0
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
            biases += name.endswith(".bias")
        if not biases:
            raise ValueError("method=bitfit: this model has no bias Parameters to train")
        return model
    import peft

    common = dict(task_type="CAUSAL_LM")
    if cfg.method in ("lora", "qlora"):
        config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=_targets(cfg), **common)
    elif cfg.method == "adalora":
        config = peft.AdaLoraConfig(init_r=cfg.lora_r, target_r=cfg.adalora_target_r, lora_alpha=cfg.lora_alpha,
                                    lora_dropout=cfg.lora_dropout, target_modules=_targets(cfg),
                                    total_step=cfg.max_steps, tinit=min(cfg.warmup_steps, cfg.max_steps // 4),
                                    tfinal=cfg.max_steps // 4, **common)
    elif cfg.method == "ia3":
        targets = None if cfg.lora_targets == ["all-linear"] else cfg.lora_targets  # PEFT's per-model defaults
        config = peft.IA3Config(target_modules=targets, feedforward_modules=[] if targets else None, **common)
    elif cfg.method == "prompt-tuning":
        config = peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    else:
        config = peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if cfg.method == "qlora" and getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model = peft.get_peft_model(model, config)
    if cfg.method == "qlora" and not getattr(model, "is_loaded_in_4bit", False):
        from ..nn import quantize_linears

        done = quantize_linears(model)
        log(f"qlora: {len(done)} linear layers quantised to NF4 (fastnlg NF4Linear; bitsandbytes' 4-bit needs CUDA)")
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
    """Global micro-batches (batch_size rows per process) in a seeded order per epoch, the same on every
    process; `position` (epoch, index) is saved in checkpoints. next() -> (this process's batch, target
    tokens of the whole global micro-batch)."""

    def __init__(self, rows: list, batch_size: int, seed: int, pad_id: int, dist: Dist | None = None):
        self.dist = dist or Dist.single()
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.global_size = batch_size * self.dist.world
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

    def next(self) -> tuple[dict, int]:
        if self.index + self.global_size > len(self._order):  # a global batch never wraps an epoch
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._shuffle()
        picked = [self.rows[i] for i in self._order[self.index:self.index + self.global_size]]
        self.index += self.global_size
        n = sum(int((r["labels"][1:] != data.IGNORE).sum()) for r in picked)
        return data.collate(self.dist.shard(picked, self.batch_size), self.pad_id), n


def _autocast(cfg, device):
    if cfg.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def _offload(cfg, device):
    """Checkpointed layer inputs (saved by the reentrant checkpoint) go to CPU memory until backward."""
    import contextlib

    if not cfg.offload_activations:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


SYNC_DEBUG_MODE = "error"  # what sync_debug sets inside a step ("warn": tests/host_syncs.py names each read)


def _sync_debug(cfg, device, on: bool) -> None:
    if cfg.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode(SYNC_DEBUG_MODE if on else "default")


def make_optimizer(params, cfg: TrainConfig, device):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def _accuracy_counts(model, device):
    """A (2,) device tensor the fused LM heads count token accuracy into (also filled from the logits of an
    unpatched model by forward_backward)."""
    from ..nn.lm_head import FusedLMHead

    counts = torch.zeros(2, device=device)
    for m in model.modules():
        if isinstance(m, FusedLMHead):
            m.accuracy_counts = counts
    return counts


def forward_backward(model, micro: list, cfg: TrainConfig, device, dist: Dist | None = None, scaler=None,
                     accuracy: torch.Tensor | None = None):
    """The gradients of one optimizer step: micro = [(batch, target tokens of its global micro-batch)].
    Every loss is over the target tokens of the whole step (exact accumulation); returns the step's loss
    summed over processes (a device tensor: no host sync). `accuracy` (from _accuracy_counts) gets the
    step's [correct, counted] training tokens."""
    dist = dist or Dist.single()
    n_step = max(sum(n for _, n in micro), 1)
    loss_sum = torch.zeros((), device=device)
    for i, (b, _) in enumerate(micro):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with dist.no_grad_sync(model, last=i == len(micro) - 1):
            with _autocast(cfg, device), _offload(cfg, device):
                out = model(**b, num_items_in_batch=n_step, use_cache=False)  # packing needs no cache
            loss = out.loss
            if accuracy is not None and out.logits is not None and "labels" in b:  # unpatched: from its logits
                with torch.no_grad():
                    accuracy += token_hits(out.logits, b["labels"]).to(accuracy)
            # DDP / FSDP average gradients over processes; each loss is already over the global tokens
            (scaler.scale(loss * dist.world) if scaler else loss * dist.world).backward()
        loss_sum += loss.detach()
    return dist.all_sum(loss_sum)


def train(cfg: TrainConfig, log=print) -> dict:
    """Runs the configured fine-tuning (on every process under torchrun); returns the last metrics (and eval
    metrics when evaluated)."""
    cfg.validate()
    dist = Dist.from_env(cfg.distributed)
    try:
        return _train(cfg, dist, log if dist.main else (lambda *_: None))
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, log) -> dict:
    device = dist.device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if precision != cfg.precision:
        log(f"precision auto: {precision} on {device}")
        cfg = dataclasses.replace(cfg, precision=precision)
    seed_everything(cfg.seed)
    built_in = builtin.CONFIGS.get(cfg.model) if not os.path.isdir(cfg.model) else None
    base_dir = os.path.join(cfg.output_dir, "base")
    if built_in is None:
        model, tok = load_model_and_tokenizer(cfg, device)
    elif os.path.isdir(base_dir):  # --resume (or a re-run): the base this output folder was trained from
        cfg = dataclasses.replace(cfg, model=base_dir, tokenizer="")
        model, tok = load_model_and_tokenizer(cfg, device)
        built_in = None
    else:  # the tokenizer first (data validation needs it); the model once the data is valid
        tok = builtin.train_tokenizer(data.corpus(cfg.train_files), built_in["vocab"])
    samples, fmt = data.load_samples(cfg.train_files, tok, cfg.max_length, cfg.truncate)  # DataError before output
    if cfg.eval_files:
        train_samples = samples
        eval_samples, _ = data.load_samples(cfg.eval_files, tok, cfg.max_length, cfg.truncate)
    else:
        train_samples, eval_samples = data.split(samples, cfg.eval_fraction, cfg.seed)
    train_rows = make_rows(train_samples, cfg, tok.pad_token_id)
    eval_rows = data.pad_rows(eval_samples, tok.pad_token_id)
    if len(train_rows) < cfg.batch_size * dist.world:
        raise data.DataError(f"{cfg.train_files[0]}: {len(train_rows)} training rows, fewer than one global batch "
                             f"(batch_size {cfg.batch_size} x {dist.world} processes)")

    if dist.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    if built_in is not None:
        if dist.main:
            builtin.save(base_dir, tok, built_in, cfg.max_length, cfg.seed)
            log(f"built {cfg.model} from scratch (random init, tokenizer trained on the data) in {base_dir}")
        dist.barrier()
        cfg = dataclasses.replace(cfg, model=base_dir, tokenizer="")
        model = load_model(cfg, device)
        seed_everything(cfg.seed)
    model = prepare_method(model, cfg, log)
    report = None
    if cfg.patch:
        import fastnlg

        report = fastnlg.patch(model)
        if dist.main:
            with open(os.path.join(cfg.output_dir, "patch_report.txt"), "w") as f:
                f.write(str(report) + "\n")
        log(str(report))
    core = model  # the unwrapped model: saving, unpatching, AdaLoRA's rank allocation
    accuracy = _accuracy_counts(core, device)  # training token accuracy since the last log line
    model = dist.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    # no host sync per step where the optimizer can skip a step on the device (fused AdamW reads found_inf):
    # the NaN guard's counter is then read at log steps only
    lazy_guard = scaler is None and getattr(optimizer, "defaults", {}).get("fused", False)
    batches = Batches(train_rows, cfg.batch_size, cfg.seed, tok.pad_token_id, dist)
    state = {"best_eval_loss": None, "evals_without_improvement": 0, "bad_steps": 0, "skipped_steps": 0}
    step = 0
    if cfg.resume:
        last = checkpoint.list_checkpoints(cfg.output_dir)[-1]
        saved = checkpoint.load(last, model, optimizer, scheduler, scaler, dist)
        step = saved["step"]
        batches.restore(saved["data_position"])
        state.update(saved["trainer"])
        log(f"resumed from {last} at step {step}")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if dist.main:
        _keep_metrics(metrics_path, step if cfg.resume else 0)  # rows after the checkpoint are run again
    trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log(f"training {cfg.method}: {trainable:,} trainable parameters, {len(train_rows)} rows of "
        f"{'packed ' if cfg.packing else ''}{fmt} data, {len(eval_rows)} held out, on {device}"
        + (f" x {dist.world} processes ({dist.mode})" if dist.on else ""))

    board = _tensorboard(cfg) if dist.main else None

    def write(record):
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if board is not None:
                for k, v in record.items():
                    if k != "step" and v is not None:
                        board.add_scalar(k if k.startswith("eval_") else f"train/{k}", v, record["step"])

    def save_checkpoint():
        checkpoint.save(cfg.output_dir, step, model, optimizer, scheduler, scaler,
                        {"data_position": batches.position(), "trainer": state}, cfg.keep_checkpoints, dist)

    progress = _progress(cfg, step, dist.main)
    last = {}
    model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bad_run = torch.zeros((), device=device, dtype=torch.int32)  # consecutive skipped steps (lazy guard)
    skipped = torch.zeros((), device=device, dtype=torch.int32)
    while step < cfg.max_steps:
        logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
        _sync_debug(cfg, device, on=step > 0 and not logging)  # the first step tunes kernels
        micro = [batches.next() for _ in range(cfg.grad_accum)]
        loss_sum = forward_backward(model, micro, cfg, device, dist, scaler, accuracy)
        tokens_seen += sum(int(b["input_ids"].numel()) for b, _ in micro) * dist.world
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        if lazy_guard:
            optimizer.found_inf = (~finite).float()  # the fused step is skipped on the device
            optimizer.step()
            bad_run = torch.where(finite, torch.zeros_like(bad_run), bad_run + 1)
            skipped += (~finite).int()
        elif bool(finite):  # one host sync per step
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
        if cfg.method == "adalora":
            dist.unwrap(model).base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        _sync_debug(cfg, device, on=False)
        if lazy_guard and logging:
            state["bad_steps"], state["skipped_steps"] = int(bad_run), state["skipped_steps"] + int(skipped)
            skipped.zero_()
        if state["bad_steps"] >= cfg.max_bad_steps:
            raise FloatingPointError(f"{cfg.max_bad_steps} non-finite steps in a row at step {step}; "
                                     "lower learning_rate or use fp32 (last good checkpoint kept)")
        if logging:
            elapsed = time.perf_counter() - t0
            correct, counted = dist.all_sum(accuracy.clone()).tolist()
            accuracy.zero_()
            last = {"step": step, "loss": loss_sum.item(), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "token_accuracy": correct / counted if counted else None,
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "peak_memory_mb": _peak_mb(device), "skipped_steps": state["skipped_steps"]}
            write(last)
            progress.update(step, last)
            tokens_seen, t0 = 0, time.perf_counter()
        if eval_rows and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            ev = {"step": step, **loss_metrics(model, eval_rows, tok.pad_token_id, cfg.batch_size, device, dist)}
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
    if board is not None:
        board.close()
    save_final(model, tok, cfg, dist)
    if dist.main:
        plot_metrics(metrics_path, cfg.output_dir)
    if report is not None:
        import fastnlg

        fastnlg.unpatch(core)
    return last


def _tensorboard(cfg: TrainConfig):
    """A SummaryWriter in output_dir/tensorboard when the tensorboard package is installed, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))


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
    def __init__(self, cfg, start, main=True):
        self.bar = None
        if cfg.progress and main:
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


def save_final(model, tok, cfg: TrainConfig, dist: Dist | None = None) -> str:
    """adapter/ (PEFT format) for the PEFT methods, model/ (Transformers, safetensors) otherwise; with the
    tokenizer. Every process calls it (FSDP gathers the shards), the first one writes."""
    dist = dist or Dist.single()
    path = os.path.join(cfg.output_dir, "model" if cfg.method in ("full", "bitfit") else "adapter")
    core = dist.unwrap(model)
    state = dist.full_state(model, trainable_only=False) if dist.mode == "fsdp" else None
    if dist.main:
        core.save_pretrained(path, **({"state_dict": state} if state is not None else {}))
        tok.save_pretrained(path)
    dist.barrier()
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
