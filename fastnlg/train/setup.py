"""The trainer's set-up steps, in the order it runs them (trainer._train): device and precision, model and
tokenizer (a local folder, or a built-in config built from scratch once the data is valid), data, the
method's trainable Parameters (PEFT or BitFit), patch, optimizer, scheduler and gradient scaler. Each step
is a function of the config, so benchmarks and tests build exactly what a run builds."""
from __future__ import annotations

import dataclasses
import math
import os
import random

import numpy as np
import torch

from .. import loading
from . import builtin, tasks
from .config import TrainConfig, resolve_precision
from .distributed import Dist


def pick_device(name: str) -> torch.device:
    return Dist.single().device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision(cfg: TrainConfig, device, log) -> TrainConfig:
    """cfg with its precision resolved on `device` ("auto" -> bf16 / fp16 / fp32: config.resolve_precision)."""
    resolved = resolve_precision(cfg.precision, device)
    if resolved != cfg.precision:
        log(f"precision auto: {resolved} on {device}")
        cfg = dataclasses.replace(cfg, precision=resolved)
    return cfg


def bnb_4bit(cfg: TrainConfig, device) -> bool:
    """QLoRA on bitsandbytes' NF4 (CUDA with bitsandbytes installed); elsewhere on fastnlg's NF4Linear."""
    return cfg.method == "qlora" and loading.bitsandbytes_4bit_available(device)


def load_model(cfg: TrainConfig, device, task=None, **kwargs):
    """The model of cfg.model for its task (a causal LM unless told) on `device`: 4-bit through bitsandbytes
    for QLoRA on CUDA, the frozen base of the adapter methods in the compute dtype (PEFT keeps the adapters
    fp32), fp32 otherwise; `kwargs` go to from_pretrained (a classifier's label set)."""
    auto_class = task.auto_class if task is not None else "AutoModelForCausalLM"
    if bnb_4bit(cfg, device):
        dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16  # no bf16 on sm_75
        return loading.load_pretrained(cfg.model, dtype=dtype, device=device, bnb_4bit=True, auto_class=auto_class,
                                       **kwargs)
    frozen_base = cfg.method not in ("full", "bitfit") and cfg.precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision] if frozen_base else torch.float32
    return loading.load_pretrained(cfg.model, dtype=dtype, device=device, auto_class=auto_class, **kwargs)


def base_dir(cfg: TrainConfig) -> str:
    """Where a built-in config's model is saved as initialised (and loaded from on --resume)."""
    return os.path.join(cfg.output_dir, "base")


def model_and_tokenizer(cfg: TrainConfig, device, task=None):
    """-> (cfg, model, tokenizer, built_in). A folder loads both, once its architecture is checked against the
    task (which may read its data first: a classifier's label set); a built-in config (train/builtin.py) gets
    its tokenizer trained on the data here (or cfg.tokenizer's, or a distillation teacher's) and its model
    later (model_from_scratch, once the data is valid: model is None and built_in its config); a re-run or
    --resume of one loads the base it was trained from."""
    task = task or tasks.get(cfg.task)
    built_in = builtin.CONFIGS.get(cfg.model) if not os.path.isdir(cfg.model) else None
    if built_in is not None and os.path.isdir(base_dir(cfg)):
        cfg, built_in = dataclasses.replace(cfg, model=base_dir(cfg), tokenizer=""), None
    if built_in is None:
        config = loading.load_config(cfg.model)
        task.check_model(config, cfg.model)
        tok = loading.load_tokenizer(cfg.tokenizer or cfg.model, words=task.name == "token-classification")
        model = load_model(cfg, device, task, **task.load_kwargs(cfg, tok, config))
        task.configure(model, cfg)
        return cfg, model, tok, None
    source = cfg.tokenizer or (cfg.teacher if cfg.objective == "distill" else "")  # (a student takes its teacher's)
    if source:
        return cfg, None, loading.load_tokenizer(source), built_in
    return cfg, None, builtin.train_tokenizer(task.corpus(cfg.train_files), built_in["vocab"]), built_in


def model_from_scratch(cfg: TrainConfig, built_in: dict, tok, device, dist: Dist, log, task=None):
    """-> (cfg pointing at the saved base, model): a built-in config initialised, saved to base/ by the first
    process, and loaded as a folder by every process."""
    if dist.main:
        builtin.save(base_dir(cfg), tok, built_in, cfg.max_length, cfg.seed)
        log(f"built {cfg.model} from scratch (random init, tokenizer trained on the data) in {base_dir(cfg)}")
    dist.barrier()
    cfg = dataclasses.replace(cfg, model=base_dir(cfg), tokenizer="")
    model = load_model(cfg, device, task or tasks.get(cfg.task))
    seed_everything(cfg.seed)
    return cfg, model


def _targets(cfg: TrainConfig):
    return "all-linear" if cfg.lora_targets == ["all-linear"] else cfg.lora_targets


def peft_config(cfg: TrainConfig):
    """The PEFT config of cfg.method (None for full fine-tuning and BitFit)."""
    if cfg.method in ("full", "bitfit"):
        return None
    import peft

    task_type = tasks.get(cfg.task).peft_task_type
    common = dict(task_type=task_type) if task_type else {}
    if task_type in ("TOKEN_CLS", "SEQ_CLS") and _targets(cfg) == "all-linear":
        # the classification head is trained in full (PEFT's modules_to_save for these tasks), so "all-linear"
        # leaves it out (LoRA on it too is refused by PEFT)
        common["exclude_modules"] = r"(.*\.)?(classifier|score)(\..*)?"
    if cfg.method in ("lora", "qlora"):
        return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=_targets(cfg), **common)
    if cfg.method == "adalora":
        return peft.AdaLoraConfig(init_r=cfg.lora_r, target_r=cfg.adalora_target_r, lora_alpha=cfg.lora_alpha,
                                  lora_dropout=cfg.lora_dropout, target_modules=_targets(cfg),
                                  total_step=cfg.max_steps, tinit=min(cfg.warmup_steps, cfg.max_steps // 4),
                                  tfinal=cfg.max_steps // 4, **common)
    if cfg.method == "ia3":
        targets = None if cfg.lora_targets == ["all-linear"] else cfg.lora_targets  # PEFT's per-model defaults
        return peft.IA3Config(target_modules=targets, feedforward_modules=[] if targets else None, **common)
    if cfg.method == "prompt-tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)


def prepare_method(model, cfg: TrainConfig, log=print):
    """Which Parameters train: all (full); the biases (bitfit); otherwise PEFT's modules for the method, so
    the adapter saves and loads in PEFT's format (loading.prepare_for_training: QLoRA's LoRA over NF4 base
    layers, bitsandbytes' when the model was loaded 4-bit, else fastnlg's NF4Linear). Gradient checkpointing
    as configured (offloading needs the reentrant form: its saved inputs go through the saved-tensor hooks)."""
    if cfg.method == "bitfit":
        biases = 0
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
            biases += name.endswith(".bias")
        if not biases:
            raise ValueError("method=bitfit: this model has no bias Parameters to train")
    model, quantised = loading.prepare_for_training(model, peft_config(cfg), four_bit=cfg.method == "qlora",
                                                    gradient_checkpointing=cfg.gradient_checkpointing,
                                                    use_reentrant=cfg.offload_activations)
    if quantised:
        log(f"qlora: {len(quantised)} linear layers quantised to NF4 (fastnlg NF4Linear; bitsandbytes' 4-bit needs "
            "CUDA)")
    return model


def make_optimizer(params, cfg: TrainConfig, device):
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             **({"fused": True} if device.type == "cuda" else {"foreach": True}))


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


def make_scheduler(optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def make_scaler(cfg: TrainConfig):
    """fp16 trains with a gradient scaler; bf16 and fp32 need none."""
    return torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
