"""Block sizes chosen by measurement, for the tiled kernels (attention, NF4 matmul) whose best tile depends
on the GPU: `tuned_launch(kernel, configs, fields, interpret_config, grid, key, args, meta, device)`.

A launcher passes its problem key (kernel, dtype, head dim, feature flags, power-of-2 buckets of the sizes),
its candidate configs (all in the file's AOT_SPECS, so each one compiles and fits the shared memory of every
target) and a function that launches one config. The first call with a key on a CUDA device launches each
candidate once (compile + warm-up), then times REPS launches of each with CUDA events; the fastest is kept
for that key and device for the rest of the process. The outputs of those launches are overwritten by the
caller's own launch with the winner, so the kernels must not accumulate into their outputs (ours store).

On a CUDA device the candidates are first narrowed to those of its architecture (`launch_candidates`: no
config that spills or overflows shared memory there, kernels/_arch.py). No measurement (the first candidate:
the untuned default) under TRITON_INTERPRET, on CPU tensors, during CUDA graph capture, with
FASTNLG_AUTOTUNE=0, or with a single candidate. `chosen()` lists what was picked (the benchmark reports
record it).
"""
from __future__ import annotations

import os

import torch

from ._arch import candidates as arch_candidates
from ._arch import table_arch

REPS = 3
_BEST: dict = {}
_ARCH: dict = {}


def device_arch(device: torch.device) -> int:
    """The compile target whose candidate table a CUDA device uses (kernels/_arch.table_arch)."""
    arch = _ARCH.get(device)
    if arch is None:
        arch = _ARCH[device] = table_arch(torch.cuda.get_device_capability(device))
    return arch


def has_candidate(group: str, configs, device: torch.device) -> bool:
    """Whether launch `group` has a config that compiles cleanly on `device`'s architecture (always off CUDA).
    Where it has none, the caller runs another path (AOT_FALLBACK in the kernel file says which)."""
    return device.type != "cuda" or bool(arch_candidates(group, list(configs), device_arch(device)))


def launch_candidates(group: str | None, configs, device: torch.device) -> list:
    """`configs` less those excluded on `device`'s architecture (all of them off CUDA)."""
    configs = list(configs)
    if group is None or device.type != "cuda":
        return configs
    arch = device_arch(device)
    kept = arch_candidates(group, configs, arch)
    if not kept:  # callers check has_candidate where a group may have none (the AOT tier checks the rest)
        raise RuntimeError(f"{group}: no candidate config compiles cleanly for sm_{arch} (kernels/_excluded.py)")
    return kept


def _measure_allowed(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("FASTNLG_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def _time_ms(launch, cfg) -> float:
    launch(cfg)  # compile and warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        launch(cfg)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPS


def pick(key: tuple, candidates, launch, device: torch.device):
    """The config to run `key` with: measured once per (key, device), else the first candidate."""
    candidates = list(candidates)
    if len(candidates) == 1 or not _measure_allowed(device):
        return candidates[0]
    full_key = (*key, str(device))
    best = _BEST.get(full_key)
    if best is None:
        from triton.runtime.errors import OutOfResources

        times = {}
        for cfg in candidates:
            try:
                times[cfg] = _time_ms(launch, cfg)
            except OutOfResources:  # a GPU with less shared memory than the AOT targets
                continue
        if not times:
            raise RuntimeError(f"no candidate config of {key[0]} could launch on {device}: {candidates}")
        best = _BEST[full_key] = min(times, key=times.get)
    return best


def chosen() -> dict:
    """{key: config} picked so far in this process."""
    return dict(_BEST)


def tuned_launch(kernel, configs, fields, interpret_config, grid, key: tuple, args: tuple, meta: dict, device,
                 group: str | None = None):
    """kernel[grid(cfg)](*args, **meta, **cfg) with cfg the config of `configs` (tuples, named by `fields`:
    block sizes, num_warps, num_stages) that are candidates of launch `group` on `device`'s architecture,
    measured fastest for `key` on `device` (see `pick`); under TRITON_INTERPRET, `interpret_config` (small
    tiles, so CPU tests cross several blocks): Triton launches on CPU tensors only under its interpreter."""
    candidates = [interpret_config] if device.type != "cuda" else launch_candidates(group, configs, device)

    def launch(cfg):
        named = dict(zip(fields, cfg))
        kernel[grid(named)](*args, **meta, **named)

    launch(pick(key, candidates, launch, device))
