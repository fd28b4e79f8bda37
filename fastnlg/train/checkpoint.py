"""Atomic training checkpoints that load without unpickling arbitrary objects.

A checkpoint is a folder `checkpoint-<step>/`:
    trainable.safetensors   the trainable Parameters (all of them for full fine-tuning, the adapters for LoRA)
    optimizer.pt, scheduler.pt, scaler.pt   state dicts of tensors and numbers (torch.load(weights_only=True))
    rng-<rank>.safetensors  each process's torch (and CUDA) generator states
    rng-<rank>.json         each process's python and numpy RNG states
    state.json              step, world size, data position, trainer counters
It is written into `.tmp-checkpoint-<step>/`, every file fsynced, then renamed into place and the folder
fsynced: a kill at any moment leaves the previous checkpoint intact. Only the last `keep` are kept. Under FSDP
the tensors are gathered to full ones, so a checkpoint does not depend on how the model was sharded.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import Dist
from .errors import ConfigError


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON-able) RNG states of torch (+CUDA), python and numpy."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict, states: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save(output_dir: str, step: int, model, optimizer, scheduler, scaler, state: dict, keep: int,
         dist: Dist | None = None) -> str:
    """Every rank calls this (FSDP gathers its shards); rank 0 writes, each rank adds its RNG state."""
    dist = dist or Dist.single()
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    trainable = dist.full_state(model, trainable_only=True)
    optim = dist.optimizer_state(model, optimizer)
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(trainable, os.path.join(tmp, "trainable.safetensors"))
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if scaler is not None:
            torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "step": step, "world_size": dist.world}, f)
    dist.barrier()
    tensors, rng = rng_state()
    save_file(tensors, os.path.join(tmp, f"rng-{dist.rank}.safetensors"))
    with open(os.path.join(tmp, f"rng-{dist.rank}.json"), "w") as f:
        json.dump(rng, f)
    dist.barrier()
    if dist.main:
        _fsync_tree(tmp)
        if os.path.exists(final):  # a re-run of the same step: the new one replaces it only once it is complete
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(output_dir)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints (never a .tmp- one), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(n.split("-", 1)[1]), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()
             and os.path.isfile(os.path.join(output_dir, n, "state.json"))]
    return [path for _, path in sorted(found)]


def load(path: str, model, optimizer, scheduler, scaler, dist: Dist | None = None) -> dict:
    """Restores everything `save` wrote (on every rank); returns the state.json dict."""
    dist = dist or Dist.single()
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state.get("world_size", 1) != dist.world:
        raise ConfigError(f"resume: {path} was written by {state.get('world_size', 1)} processes, resumed with "
                         f"{dist.world}; resume with the same number of processes (the data order depends on it)")
    params = dict(dist.unwrap(model).named_parameters())
    saved = load_file(os.path.join(path, "trainable.safetensors"))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    if missing or set(saved) - set(params):
        raise ConfigError(f"resume: {path} does not match the model (another method or model?)  missing {missing[:3]}, unknown "
                         f"{sorted(set(saved) - set(params))[:3]})")
    dist.load_params(model, saved)
    dist.load_optimizer_state(model, optimizer, torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))
    with open(os.path.join(path, f"rng-{dist.rank}.json")) as f:
        set_rng_state(load_file(os.path.join(path, f"rng-{dist.rank}.safetensors")), json.load(f))
    return state
