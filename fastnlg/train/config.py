"""The training configuration: one dataclass, validated before anything runs (unknown key, wrong type,
impossible combination -> ConfigError naming the key and what is allowed)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from .errors import ConfigError

METHODS = ("full", "lora", "qlora", "prompt-tuning", "prefix", "ia3", "adalora", "bitfit")
PROMPT_METHODS = ("prompt-tuning", "prefix")  # virtual tokens in front of each row: no packing
# what the trainer optimises: sft (the task's own loss), a preference objective (train/tasks/preference.py, kto.py),
# or distillation from a teacher model (train/tasks/distill.py)
OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "kto", "distill")
PREFERENCE = ("dpo", "simpo", "orpo", "kto")  # on {prompt, chosen, rejected} pairs, or kto's {prompt, completion, label}
REFERENCE = ("dpo", "kto")  # objectives with a reference model (the adapter-disabled base, or a copy with method=full)
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")
OPTIMIZERS = ("adamw", "adamw8bit")
DISTRIBUTED = ("ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_CAPABILITY = (8, 0)  # the first GPUs with bf16 arithmetic (A100, RTX 30); T4 / RTX 20 are 7.5


@dataclass
class TrainConfig:
    task: str = "causal-lm"  # causal-lm | token-classification | sequence-classification | masked-lm | seq2seq
    model: str = ""  # a local Transformers model folder, or a built-in config name (train/builtin.py)
    train_files: list = field(default_factory=list)
    output_dir: str = "out"
    tokenizer: str = ""  # defaults to the model folder (a built-in config: one trained on the data)
    eval_files: list = field(default_factory=list)
    eval_fraction: float = 0.05  # held out from train_files when eval_files is empty
    max_length: int = 256
    truncate: bool = True
    packing: bool = True
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["all-linear"])  # LoRA/QLoRA/AdaLoRA/IA3 target modules
    adalora_target_r: int = 4  # AdaLoRA: the average rank it prunes lora_r down to
    num_virtual_tokens: int = 16  # prompt tuning and prefix tuning
    optimizer: str = "adamw"  # adamw (fused on CUDA, foreach on CPU) | adamw8bit (bitsandbytes, CUDA)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp16 + gradient scaler on one without, fp32 on CPU
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # checkpointed layer inputs kept in (pinned) CPU memory until backward
    distributed: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2, one shard group per decoder layer)
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    early_stopping_patience: int = 0  # evaluations without a better eval loss before stopping; 0 = off
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    resume: bool = False
    resume_force: bool = False  # resume even where the configuration or the data differ from the checkpoint's
    patch: bool = True
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True  # also log to output_dir/tensorboard when the tensorboard package is installed
    sync_debug: bool = False  # CUDA: raise on any host synchronisation inside a training step between logs
    labels: list = field(default_factory=list)  # classification: the label set, in id order (default: see tasks)
    class_weights: list = field(default_factory=list)  # classification: one loss weight per label, in label order
    tag_column: int = -1  # token classification, CoNLL files: the column holding the tag
    label_all_tokens: bool = False  # token classification: label every sub-token (default: a word's first)
    mlm_probability: float = 0.15  # masked LM: the share of tokens masked
    objective: str = "sft"  # sft | dpo | simpo | orpo | kto | distill (see OBJECTIVES above)
    beta: float = 0.1  # dpo / simpo / orpo / kto: the preference loss's beta (SimPO's own default is 2.0)
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma
    kto_desirable_weight: float = 1.0  # kto: the loss weight of desirable (label true) examples
    kto_undesirable_weight: float = 1.0  # kto: ... and of undesirable ones
    teacher: str = ""  # distill: the teacher, a causal-LM folder with the student's vocabulary
    distill_loss: str = "forward_kl"  # distill: forward_kl (KL(teacher || student)) | reverse_kl | jsd
    distill_beta: float = 0.5  # distill with jsd: the interpolation beta of TRL's GKD (0: forward KL, 1: reverse)
    distill_temperature: float = 1.0  # distill: both models' logits divided by it before the softmax

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown config key {key!r}; allowed: {', '.join(sorted(known))}")
        cfg = cls(**{k: _coerce(k, v, known[k]) for k, v in values.items()})
        if (cfg.method in PROMPT_METHODS or cfg.task != "causal-lm" or cfg.objective in PREFERENCE) \
                and "packing" not in values:
            cfg.packing = False  # the default follows the method and task; packing=true given explicitly is refused
        cfg.validate()
        return cfg

    def ensure_valid(self) -> None:
        """validate() unless this config, with these values, has already passed it (from_dict validates; the
        trainer calls this, so a config built by from_dict is checked once)."""
        if self.__dict__.get("_validated") != dataclasses.astuple(self):
            self.validate()

    def validate(self) -> None:
        def need(ok, key, allowed):
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed: {allowed}")

        from .builtin import CONFIGS, task_of
        from .tasks import NAMES

        need(self.task in NAMES, "task", f"one of {NAMES}")
        encoder = self.task != "causal-lm"
        built_in = self.model in CONFIGS and not os.path.isdir(self.model)
        need(not (built_in and task_of(self.model) != self.task), "model",
             f"a local model folder with task={self.task}, or a built-in config for it "
             f"({', '.join(n for n in CONFIGS if task_of(n) == self.task) or 'there is none'}); "
             f"{self.model} is a {task_of(self.model) if built_in else ''} model")
        need(not (encoder and self.packing), "packing", f"false with task={self.task} (one example per row)")
        need(not (encoder and self.method in PROMPT_METHODS), "method",
             f"not {self.method} with task={self.task} (full, lora, qlora, ia3, adalora or bitfit)")
        need(0 < self.mlm_probability < 1, "mlm_probability", "in (0, 1)")
        need(self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}")
        preference = self.objective in PREFERENCE
        need(not (self.objective != "sft" and self.task != "causal-lm"), "objective", f"sft with task={self.task} "
             "(preference objectives and distillation train causal LMs)")
        need(not (preference and self.packing), "packing", f"false with objective={self.objective} (one pair per row)")
        need(not (self.objective != "sft" and self.method in PROMPT_METHODS), "method",
             f"not {self.method} with objective={self.objective} (full, lora, qlora, ia3, adalora or bitfit)")
        need(not (self.objective in REFERENCE and self.method == "full" and self.resume), "resume",
             f"false with objective={self.objective} and method=full: the reference model (the initial weights) is "
             "not in the checkpoints; with method=lora the reference is the base with the adapter disabled, and "
             "resume works")
        need(not (self.objective == "kto" and self.batch_size < 2), "batch_size",
             ">= 2 with objective=kto (its KL baseline pairs each prompt with another example's completion of the "
             "micro-batch)")
        need(self.beta > 0, "beta", "> 0")
        need(self.kto_desirable_weight >= 0 and self.kto_undesirable_weight >= 0, "kto_desirable_weight",
             "weights >= 0 (both)")
        need(not (self.objective == "distill" and not self.teacher), "teacher",
             "a causal-LM model folder with objective=distill")
        need(not (self.teacher and self.objective != "distill"), "teacher", "given only with objective=distill")
        need(not self.teacher or os.path.isdir(self.teacher), "teacher", "an existing model folder")
        need(self.distill_loss in DISTILL_LOSSES, "distill_loss", f"one of {DISTILL_LOSSES}")
        need(0.0 <= self.distill_beta <= 1.0, "distill_beta", "in [0, 1]")
        need(self.distill_temperature > 0, "distill_temperature", "> 0")
        need(not self.class_weights or self.task in ("token-classification", "sequence-classification"),
             "class_weights", "given only with task=token-classification or sequence-classification")
        need(not self.class_weights or self.patch, "class_weights",
             "given only with the patch on (the unpatched model's own loss takes no class weights)")
        try:
            weights = [float(w) for w in self.class_weights]
        except ValueError:
            weights = None
        need(weights is not None and all(w >= 0 for w in weights), "class_weights", "numbers >= 0")
        need(bool(self.model), "model", "a local model folder or a built-in config name is required")
        need(os.path.isdir(self.model) or self.model in CONFIGS, "model",
             f"no such folder, and not a built-in config ({', '.join(CONFIGS)})")
        need(not (self.model in CONFIGS and not os.path.isdir(self.model) and self.method == "qlora"), "method",
             "not qlora with a built-in config (trained from scratch: use full)")
        need(bool(self.train_files), "train_files", "at least one training file is required")
        for key in ("train_files", "eval_files"):
            for path in getattr(self, key):
                need(os.path.isfile(path), key, f"file {path!r} does not exist")
        need(self.method in METHODS, "method", f"one of {METHODS}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        need(self.distributed in DISTRIBUTED, "distributed", f"one of {DISTRIBUTED}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "auto, cpu, cuda[:N]")
        for key in ("max_length", "max_steps", "batch_size", "grad_accum", "lora_r", "eval_every", "save_every",
                    "log_every", "max_bad_steps", "adalora_target_r", "num_virtual_tokens"):
            need(getattr(self, key) > 0, key, "an integer > 0")
        for key in ("warmup_steps", "keep_checkpoints", "early_stopping_patience"):
            need(getattr(self, key) >= 0, key, "an integer >= 0")
        need(self.learning_rate > 0, "learning_rate", "> 0")
        need(0 <= self.eval_fraction < 1, "eval_fraction", "in [0, 1)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        need(self.precision != "fp16" or self.device not in ("cpu",), "precision",
             "fp16 needs a CUDA device (CPU autocast runs bf16)")
        need(not (self.method in PROMPT_METHODS and self.packing), "packing",
             f"false with method={self.method} (its virtual tokens go in front of every row, so packed samples "
             "would share them)")
        need(self.method != "adalora" or self.adalora_target_r <= self.lora_r, "adalora_target_r",
             f"<= lora_r ({self.lora_r})")
        need(not self.offload_activations or self.gradient_checkpointing, "offload_activations",
             "true only with gradient_checkpointing: true (it offloads the checkpointed layer inputs)")
        if self.optimizer == "adamw8bit":
            import importlib.util

            import torch

            need(self.device != "cpu" and torch.cuda.is_available(), "optimizer",
                 "adamw8bit needs a CUDA device (bitsandbytes' 8-bit optimizer); use adamw")
            need(importlib.util.find_spec("bitsandbytes") is not None, "optimizer",
                 "adamw8bit needs bitsandbytes installed (pip install bitsandbytes)")
        self.__dict__["_validated"] = dataclasses.astuple(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def resolve_precision(precision: str, device, capability: tuple | None = None, gpu_name: str = "") -> str:
    """The precision a run trains in on `device` (a torch.device): "auto" is bf16 autocast on a GPU with bf16
    arithmetic (compute capability 8.0 or newer), fp16 autocast with a gradient scaler on an older one (T4,
    RTX 20: no bf16 units; bf16 there would be emulated, slow), and fp32 on CPU. An explicit bf16 on a GPU
    without it is a ConfigError. `capability` / `gpu_name` default to the device's own (tests pass them)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not allowed: one of {PRECISIONS}")
    if device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    if capability is None:
        import torch

        capability, gpu_name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    has_bf16 = tuple(capability) >= BF16_CAPABILITY
    if precision == "auto":
        return "bf16" if has_bf16 else "fp16"
    if precision == "bf16" and not has_bf16:
        major, minor = capability
        raise ConfigError(f"precision='bf16' is not allowed: {gpu_name or 'this GPU'} (sm_{major}{minor}) has no bf16 "
                          "arithmetic; use fp16 or auto (fp16 autocast with a gradient scaler)")
    return precision


def _coerce(key, value, f):
    """JSON/YAML/flag values to the field's type; a wrong type names the key."""
    kind = type(f.default) if f.default is not dataclasses.MISSING else list
    if kind is list:
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):  # (not str.isdigit: "²" is a digit)
            return int(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key {key!r} must be {kind.__name__}{' (list of strings)' if kind is list else ''}, "
                      f"got {value!r}")


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
        except RecursionError:
            raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return values
