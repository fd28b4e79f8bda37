"""What a run records as it goes: metrics.jsonl (one JSON line per logged step and per evaluation), the same
scalars in TensorBoard when it is installed, and the progress bar. Only the first process writes."""
from __future__ import annotations

import json
import os

import torch


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def keep_metrics(path: str, upto: int) -> None:
    """metrics.jsonl without the rows of steps after `upto` (all of them for a fresh run)."""
    if not os.path.exists(path):
        return
    rows = [line for line in open(path) if line.strip() and upto and json.loads(line)["step"] <= upto]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def _tensorboard(cfg):
    """A SummaryWriter in output_dir/tensorboard when the tensorboard package is installed, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))


class MetricsLog:
    """metrics.jsonl in output_dir (rows after `resumed_at` dropped: those steps run again) and TensorBoard."""

    def __init__(self, cfg, main: bool, resumed_at: int = 0):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.main = main
        self.board = _tensorboard(cfg) if main else None
        if main:
            keep_metrics(self.path, resumed_at)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.board.add_scalar(k if k.startswith("eval_") else f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class Progress:
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
