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

Faults: a write that fails (a full disk: OSError) removes the partial folder and raises CheckpointError naming
the checkpoint that is still intact. Resuming reads a checkpoint whole before it changes anything (`read`), so a
damaged one (a truncated file, a missing optimizer state, a state.json that is not JSON) is skipped for the next
older one with the reason (`newest_readable`); state.json also keeps the run's configuration and a fingerprint of
its data, and `differences` names what a resume would change.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import Dist
from .errors import CheckpointError, ConfigError


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
    """Every rank calls this (FSDP gathers its shards); rank 0 writes, each rank adds its RNG state. An OSError
    while writing (a full or failing disk) removes the partial folder and raises CheckpointError."""
    dist = dist or Dist.single()
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    trainable = dist.full_state(model, trainable_only=True)
    optim = dist.optimizer_state(model, optimizer)
    try:
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
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [os.path.basename(p) for p in list_checkpoints(output_dir)]
        raise CheckpointError(
            f"saving checkpoint-{step} failed: {exc.strerror or exc} ({exc.filename or output_dir}); the partial "
            f"checkpoint was removed and " + (f"{kept[-1]} is intact: make room and continue with --resume"
                                              if kept else "there is no earlier checkpoint")) from exc
    if dist.main:
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(output_dir: str) -> list:
    """The checkpoint-<step> folders (never a .tmp- one), oldest first; `read` tells whether one is whole."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(n.split("-", 1)[1]), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()
             and os.path.isdir(os.path.join(output_dir, n))]
    return [path for _, path in sorted(found)]


def _read_file(path: str, name: str, reader):
    try:
        return reader(os.path.join(path, name))
    except FileNotFoundError:
        raise CheckpointError(f"{name} is missing") from None
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises on a damaged file: the reason to skip it
        detail = (str(exc).splitlines() or ["no detail"])[0][:160]
        raise CheckpointError(f"{name} is unreadable ({type(exc).__name__}: {detail})") from None


def _json(file: str):
    with open(file) as f:
        return json.load(f)


def _torch(file: str):
    return torch.load(file, weights_only=True)


def _same_world(path: str, state: dict, dist: Dist) -> None:
    if state.get("world_size", 1) != dist.world:
        raise ConfigError(f"resume: {path} was written by {state.get('world_size', 1)} processes, resumed with "
                          f"{dist.world}; resume with the same number of processes (the data order depends on it)")


def read(path: str, dist: Dist | None = None) -> dict:
    """Every file of the checkpoint at `path` read into memory (this rank's RNG state; every rank's RNG files
    checked, so all ranks judge a checkpoint alike), or CheckpointError naming the first file that is missing
    or damaged; ConfigError when it was written by another number of processes. Nothing is changed."""
    dist = dist or Dist.single()
    state = _read_file(path, "state.json", _json)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError("state.json holds no step")
    _same_world(path, state, dist)  # before the per-rank files: a process count that differs is no damage
    out = {"state": state, "trainable": _read_file(path, "trainable.safetensors", load_file),
           "optimizer": _read_file(path, "optimizer.pt", _torch),
           "scheduler": _read_file(path, "scheduler.pt", _torch),
           "scaler": _read_file(path, "scaler.pt", _torch) if os.path.isfile(os.path.join(path, "scaler.pt")) else None}
    for rank in range(int(state.get("world_size", 1))):
        tensors = _read_file(path, f"rng-{rank}.safetensors", load_file)
        rng = _read_file(path, f"rng-{rank}.json", _json)
        if rank == dist.rank:  # (one of them: _same_world made dist.world the checkpoint's world size)
            out["rng"] = (tensors, rng)
    return out


def newest_readable(output_dir: str, dist: Dist | None = None) -> tuple[str, dict, list]:
    """-> (path, read(path), [(skipped path, why)]) for the newest checkpoint that reads whole; CheckpointError
    listing each one and why when none does."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, read(path, dist), skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    raise CheckpointError(f"resume: no checkpoint in {output_dir} can be read: "
                          + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
                          if skipped else f"resume: {output_dir} holds no checkpoint")


def load(path: str, model, optimizer, scheduler, scaler, dist: Dist | None = None, saved: dict | None = None) -> dict:
    """Restores everything `save` wrote (on every rank; `saved`: what read(path) returned, else it reads it);
    returns the state.json dict."""
    dist = dist or Dist.single()
    saved = saved if saved is not None else read(path, dist)  # read() checked the process count
    state = saved["state"]
    params = dict(dist.unwrap(model).named_parameters())
    trainable = saved["trainable"]
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in trainable)
    if missing or set(trainable) - set(params):
        raise ConfigError(f"resume: {path} does not match the model (another method or model?)  missing {missing[:3]}, "
                          f"unknown {sorted(set(trainable) - set(params))[:3]})")
    dist.load_params(model, trainable)
    dist.load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(*saved["rng"])
    return state


# what a resumed run may change: how long it runs, how it logs and checks, and where (not what it learns from)
MAY_CHANGE = ("max_steps", "eval_every", "save_every", "keep_checkpoints", "log_every", "early_stopping_patience",
              "max_bad_steps", "resume", "resume_force", "patch", "device", "progress", "tensorboard", "sync_debug",
              "output_dir", "distributed")


def fingerprint(files: list) -> dict:
    """{file: sha256 of its bytes} of the data files a run reads (folders: their files, sorted)."""
    out = {}
    for name in files:
        paths = [name] if not os.path.isdir(name) else sorted(
            os.path.join(root, f) for root, _, fs in os.walk(name) for f in fs)
        for path in paths:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[path] = h.hexdigest()
    return out


def differences(saved: dict, config: dict, data: dict) -> list:
    """What the run about to resume changes against the checkpoint's state.json: one phrase per config key
    (MAY_CHANGE excepted) and per data file; [] for a checkpoint written before state.json kept them."""
    out = []
    old = saved.get("config")
    if isinstance(old, dict):
        out += [f"{k} {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                if k not in MAY_CHANGE and old.get(k) != config.get(k)]
    old_data = saved.get("data")
    if isinstance(old_data, dict):
        out += [f"the data file {p} " + ("is new" if p not in old_data else "is no longer read" if p not in data
                                         else "has changed (another sha256)")
                for p in sorted(set(old_data) | set(data)) if old_data.get(p) != data.get(p)]
    return out
