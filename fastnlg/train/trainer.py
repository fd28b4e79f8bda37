"""The fine-tuning loop, in the shape of a single-device recipe: named set-up steps (setup.py: model,
method, patch, optimizer, scheduler, scaler, data, state), a short loop, and a guard for non-finite steps.
A local Transformers causal LM (or a built-in config trained from scratch), full fine-tuning, the PEFT
methods or BitFit, fastnlg.patch'ed unless told not to, on one process or several (DDP/FSDP2, distributed.py).

Exact accumulation: a step of `grad_accum` micro-batches counts the target tokens of all of them first
(n_step), and every micro-batch's loss is sum / n_step (`num_items_in_batch`, which the fused loss and HF's
loss both honour), so the summed gradients are those of one batch holding all the micro-batches.

Everything goes to output_dir: config.json, patch_report.txt, metrics.jsonl (records.py: per logged step loss,
lr, grad_norm, token_accuracy of the training tokens since the last line, tokens/s, peak memory; and one per
evaluation), checkpoint-<step>/ (checkpoint.py), plots (loss.png, lr.png, eval.png) and the final model
(model/ for full and BitFit, adapter/ in PEFT's format for the PEFT methods) with the tokenizer; base/ holds a
built-in config's model as initialised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import time

import torch

from . import checkpoint, setup
from .config import TrainConfig
from .distributed import Dist
from .errors import ConfigError
from .evaluate import plot_metrics
from .records import MetricsLog, Progress, peak_mb
from .tasks import Task
from .tasks import get as get_task


class Batches:
    """Global micro-batches (batch_size rows per process) in a seeded order per epoch, the same on every
    process; `position` (epoch, index) is saved in checkpoints. next() -> (this process's batch, target
    tokens of the whole global micro-batch)."""

    def __init__(self, rows: list, batch_size: int, seed: int, pad_id: int, dist: Dist | None = None,
                 task: Task | None = None):
        self.dist = dist or Dist.single()
        self.task = task or get_task("causal-lm")
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
        picked = self.task.prepare(picked)
        return self.task.collate(self.dist.shard(picked, self.batch_size), self.pad_id), self.task.count(picked)


def _autocast(cfg, device):
    if cfg.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def _offload(cfg, device):
    """Checkpointed layer inputs (saved by the reentrant checkpoint) go to CPU memory until backward."""
    if not cfg.offload_activations:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


SYNC_DEBUG_MODE = "error"  # what sync_debug sets inside a step ("warn": tests/host_syncs.py names each read)


def _sync_debug(cfg, device, on: bool) -> None:
    if cfg.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode(SYNC_DEBUG_MODE if on else "default")


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
                     accuracy: torch.Tensor | None = None, task: Task | None = None):
    """The gradients of one optimizer step: micro = [(batch, target tokens of its global micro-batch)].
    Every loss is over the target tokens of the whole step (exact accumulation); returns the step's loss
    summed over processes (a device tensor: no host sync). `accuracy` (from _accuracy_counts) gets the
    step's [correct, counted] training tokens."""
    dist = dist or Dist.single()
    task = task or get_task(cfg.task, cfg.objective)
    n_step = max(sum(n for _, n in micro), 1)
    extra = task.forward_kwargs(n_step)  # None: the model's mean loss, scaled by its batch's share below
    loss_sum = torch.zeros((), device=device)
    for i, (b, _) in enumerate(micro):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with dist.no_grad_sync(model, last=i == len(micro) - 1):
            with _autocast(cfg, device), _offload(cfg, device):
                loss = task.training_loss(model, b, cfg, n_step)  # (a task computing its own loss), or the model's:
                out = model(**b, **(extra or {})) if loss is None else None
            if out is not None:
                loss = out.loss if extra is not None else out.loss * (task.local_count(b) / n_step)
            if accuracy is not None and out is not None and out.logits is not None and "labels" in b:  # (unpatched)
                with torch.no_grad():
                    accuracy += task.token_hits(out.logits, b["labels"]).to(accuracy)
            # DDP / FSDP average gradients over processes; each loss is already over the global tokens
            (scaler.scale(loss * dist.world) if scaler else loss * dist.world).backward()
        loss_sum += loss.detach()
    return dist.all_sum(loss_sum)


class NonFiniteGuard:
    """Skips the optimizer step of a non-finite loss or gradient norm and stops after max_bad_steps in a row.

    With fused AdamW (CUDA, no fp16 scaler) the step is skipped on the device (`found_inf`) and the counters
    are read at log steps only, so a step between logs never waits for the GPU (`lazy`); elsewhere the guard
    reads one flag per step. Its counters live in the trainer state (saved in checkpoints)."""

    def __init__(self, cfg, optimizer, scaler, device, state: dict, log):
        self.cfg, self.optimizer, self.scaler, self.state, self.log = cfg, optimizer, scaler, state, log
        self.lazy = scaler is None and getattr(optimizer, "defaults", {}).get("fused", False)
        self.bad_run = torch.zeros((), device=device, dtype=torch.int32)  # consecutive skipped steps (lazy)
        self.skipped = torch.zeros((), device=device, dtype=torch.int32)

    def step(self, step: int, loss_sum, grad_norm) -> None:
        """The optimizer step of step `step` (0-based), or its skip."""
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        state, scaler = self.state, self.scaler
        if self.lazy:
            self.optimizer.found_inf = (~finite).float()  # the fused step is skipped on the device
            self.optimizer.step()
            self.bad_run = torch.where(finite, torch.zeros_like(self.bad_run), self.bad_run + 1)
            self.skipped += (~finite).int()
        elif bool(finite):  # one host sync per step
            if scaler:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            state["bad_steps"] = 0
        else:
            state["bad_steps"] += 1
            state["skipped_steps"] += 1
            if scaler:
                scaler.update()
            self.log(f"step {step + 1}: non-finite loss or gradient, optimizer step skipped "
                     f"({state['bad_steps']} in a row)")

    def check(self, step: int, logging: bool) -> None:
        """After step `step` (1-based): the lazy counters read at log steps; too many bad steps in a row stop."""
        if self.lazy and logging:
            self.state["bad_steps"] = int(self.bad_run)
            self.state["skipped_steps"] += int(self.skipped)
            self.skipped.zero_()
        if self.state["bad_steps"] >= self.cfg.max_bad_steps:
            raise FloatingPointError(f"{self.cfg.max_bad_steps} non-finite steps in a row at step {step}; "
                                     "lower learning_rate or use fp32 (last good checkpoint kept)")


def check_startable(cfg: TrainConfig) -> None:
    """What must hold before a run starts, as ConfigErrors: a valid config, and a checkpoint to resume from
    when resuming (the command line checks this once before it starts several processes)."""
    cfg.ensure_valid()
    if cfg.resume and not checkpoint.list_checkpoints(cfg.output_dir):
        raise ConfigError(f"resume={cfg.resume!r} is not allowed: output_dir {cfg.output_dir!r} holds no checkpoint "
                          "to resume from")


def train(cfg: TrainConfig, log=print) -> dict:
    """Runs the configured fine-tuning (on every process under torchrun); returns the last metrics (and eval
    metrics when evaluated)."""
    check_startable(cfg)
    dist = Dist.from_env(cfg.distributed)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:  # --progress false: no bar at all, Transformers' loading bars neither
        hf_logging.disable_progress_bar()
    try:
        return _train(cfg, dist, log if dist.main else (lambda *_: None))
    finally:
        dist.close()
        if bars:
            hf_logging.enable_progress_bar()


def _patch(model, cfg: TrainConfig, dist: Dist, log):
    if not cfg.patch:
        return None
    from ..patching import patch

    report = patch(model)
    if dist.main:
        with open(os.path.join(cfg.output_dir, "patch_report.txt"), "w") as f:
            f.write(str(report) + "\n")
    log(str(report))
    return report


@dataclasses.dataclass
class Run:
    """What the set-up steps built and the loop works on."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    log: object
    tok: object
    model: object  # as wrapped for DDP / FSDP
    core: object  # the unwrapped model: saving, unpatching, AdaLoRA's rank allocation
    params: list
    optimizer: object
    scheduler: object
    scaler: object
    batches: Batches
    eval_rows: list
    state: dict
    step: int = 0
    task: Task | None = None

    @functools.cached_property
    def data_fingerprint(self) -> dict:
        """checkpoint.fingerprint of the data files, hashed once a run."""
        return checkpoint.fingerprint(list(self.cfg.train_files) + list(self.cfg.eval_files))

    def save_checkpoint(self) -> None:
        checkpoint.save(self.cfg.output_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                        {"data_position": self.batches.position(), "trainer": self.state,
                         "config": dataclasses.asdict(self.cfg),
                         "data": self.data_fingerprint if self.dist.main else None},  # (rank 0 writes state.json)
                        self.cfg.keep_checkpoints, self.dist)

    def resume(self) -> None:
        """From the newest checkpoint that reads whole (each damaged one skipped, with why); a configuration or
        data that differs from the checkpoint's stops the run with the differences, unless resume_force."""
        last, saved, skipped = checkpoint.newest_readable(self.cfg.output_dir, self.dist)
        for path, why in skipped:
            self.log(f"resume: skipped {path}: {why}")
        changed = checkpoint.differences(saved["state"], dataclasses.asdict(self.cfg), self.data_fingerprint)
        if changed and not self.cfg.resume_force:
            raise ConfigError(f"resume: this run differs from {last}: {'; '.join(changed)}. Resume with the same "
                              "configuration and data, or pass --resume-force to continue with these anyway")
        if changed:
            self.log(f"resume: --resume-force, continuing from {last} with {'; '.join(changed)}")
        state = checkpoint.load(last, self.model, self.optimizer, self.scheduler, self.scaler, self.dist, saved)
        self.step = state["step"]
        self.batches.restore(state["data_position"])
        self.state.update(state["trainer"])
        self.log(f"resumed from {last} at step {self.step}")


def _setup(cfg: TrainConfig, dist: Dist, log) -> tuple[Run, object, str]:
    """-> (the run, the patch report or None, the data format): every set-up step, in order."""
    device = dist.device(cfg.device)
    cfg = setup.precision(cfg, device, log)
    setup.seed_everything(cfg.seed)
    task = get_task(cfg.task, cfg.objective)
    cfg, model, tok, built_in = setup.model_and_tokenizer(cfg, device, task)
    train_rows, eval_rows, fmt = task.rows(cfg, tok, dist)  # DataError before anything is written
    if dist.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    if built_in is not None:
        cfg, model = setup.model_from_scratch(cfg, built_in, tok, device, dist, log, task)
    core = setup.prepare_method(model, cfg, log)
    report = _patch(core, cfg, dist, log)
    model = dist.wrap(core)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = setup.make_optimizer(params, cfg, device)
    run = Run(cfg, dist, device, log, tok, model, core, params, optimizer, setup.make_scheduler(optimizer, cfg),
              setup.make_scaler(cfg), Batches(train_rows, cfg.batch_size, cfg.seed, tok.pad_token_id, dist, task),
              eval_rows, {"best_eval_loss": None, "evals_without_improvement": 0, "bad_steps": 0, "skipped_steps": 0},
              task=task)
    if cfg.resume:
        run.resume()
    trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log(f"training {cfg.method}: {trainable:,} trainable parameters, {len(train_rows)} rows of "
        f"{'packed ' if cfg.packing else ''}{fmt} data, {len(eval_rows)} held out, on {device}"
        + (f" x {dist.world} processes ({dist.mode})" if dist.on else ""))
    return run, report, fmt


def _train(cfg: TrainConfig, dist: Dist, log) -> dict:
    run, report, _ = _setup(cfg, dist, log)
    records = MetricsLog(run.cfg, dist.main, run.step if run.cfg.resume else 0)
    try:
        last = _loop(run, records, NonFiniteGuard(run.cfg, run.optimizer, run.scaler, run.device, run.state, log))
    finally:
        records.close()
    save_final(run.model, run.tok, run.cfg, dist)
    if dist.main:
        plot_metrics(records.path, run.cfg.output_dir)
        section = run.task.report(last) if "eval_loss" in last else ""
        if section:
            with open(os.path.join(run.cfg.output_dir, "report.md"), "w") as f:
                f.write(f"# {run.task.name}: held-out evaluation at step {last['step']}\n\n{section}")
    if report is not None:
        from ..patching import unpatch

        unpatch(run.core)
    return last


def _evaluate(run: Run, records: MetricsLog) -> tuple[dict, bool]:
    """-> (eval metrics, whether early stopping ends the run)."""
    cfg, state, step = run.cfg, run.state, run.step
    ev = {"step": step, **run.task.evaluate(run.model, run.eval_rows, run.tok, cfg, run.device, run.dist)}
    records.write(ev)
    run.log(f"step {step}: {run.task.summary(ev)}")
    best = state["best_eval_loss"]
    if best is None or ev["eval_loss"] < best:
        state["best_eval_loss"], state["evals_without_improvement"] = ev["eval_loss"], 0
    else:
        state["evals_without_improvement"] += 1
    patience = cfg.early_stopping_patience
    stop = bool(patience) and state["evals_without_improvement"] >= patience
    if stop:
        run.log(f"early stopping at step {step}: no better eval loss in {patience} evaluations")
    return ev, stop


def _loop(run: Run, records: MetricsLog, guard: NonFiniteGuard) -> dict:
    """Steps up to cfg.max_steps: forward/backward over grad_accum micro-batches, clip, the guarded optimizer
    step, log, evaluate, checkpoint. Returns the last logged metrics (with the last evaluation)."""
    cfg, device, dist = run.cfg, run.device, run.dist
    # training token accuracy since the last log line (a causal LM's next tokens)
    accuracy = _accuracy_counts(run.core, device) if run.task.token_accuracy else None
    progress = Progress(cfg, run.step, dist.main)
    last = {}
    run.model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while run.step < cfg.max_steps:
        logging = (run.step + 1) % cfg.log_every == 0 or run.step + 1 == cfg.max_steps
        _sync_debug(cfg, device, on=run.step > 0 and not logging)  # the first step tunes kernels
        micro = [run.batches.next() for _ in range(cfg.grad_accum)]
        loss_sum = forward_backward(run.model, micro, cfg, device, dist, run.scaler, accuracy, run.task)
        tokens_seen += sum(run.task.batch_tokens(b) for b, _ in micro) * dist.world
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        guard.step(run.step, loss_sum, grad_norm)
        if cfg.method == "adalora":
            run.core.base_model.update_and_allocate(run.step)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.step += 1
        _sync_debug(cfg, device, on=False)
        guard.check(run.step, logging)
        if logging:
            elapsed = time.perf_counter() - t0
            correct, counted = dist.all_sum(accuracy.clone()).tolist() if accuracy is not None else (0, 0)
            if accuracy is not None:
                accuracy.zero_()
            last = {"step": run.step, "loss": loss_sum.item(), "lr": run.scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "token_accuracy": correct / counted if counted else None,
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "peak_memory_mb": peak_mb(device), "skipped_steps": run.state["skipped_steps"],
                    **run.task.train_stats(dist)}
            records.write(last)
            progress.update(run.step, last)
            tokens_seen, t0 = 0, time.perf_counter()
        if run.eval_rows and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps):
            ev, stop = _evaluate(run, records)
            last.update(ev)
            if stop:
                run.save_checkpoint()
                break
        if run.step % cfg.save_every == 0 or run.step == cfg.max_steps:
            run.save_checkpoint()
    progress.close()
    return last


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
