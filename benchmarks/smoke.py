"""The GPU smoke run's machinery (its steps and caps are one table, SMOKE in scripts/gpu_check.py).

Each step runs in a child process of its own (`python -m benchmarks.smoke --step NAME ...`) under its cap, so a
hung kernel or a crash costs that step only. A step writes each result as one JSON line of smoke.jsonl the
moment it exists (appended, flushed and synced): a kill at any moment leaves every finished row readable.
Every row carries the step, the case, a status (ok, FAIL, error, skipped, timeout), the seconds it took and
the environment (GPU, versions, commit, date).

    run_steps(steps, budget, out_dir, log)        # the parent: every step in order, within the budget
    Context.row(case, status, **fields)           # a step's rows

`--device cpu --tiny` runs every step on CPU at tiny sizes (the Triton kernels under TRITON_INTERPRET=1): the
test tier runs it, so the code a GPU lease runs has run before the lease.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROWS = "smoke.jsonl"
LOG = "smoke.log"
TUNED = "tuned_configs.json"
OUTPUT_FILES = (ROWS, LOG, TUNED)  # what comes back from the device: at most 8 files (device tool limits)


def append_row(path: str, row: dict) -> None:
    """One JSON line, on disk before this returns (a kill right after keeps it)."""
    line = json.dumps(row, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class Context:
    """What a step function gets: its rows, its deadline, the device and the size mode."""

    def __init__(self, step: str, out_dir: str, deadline: float, device: str, tiny: bool, env: dict):
        self.step, self.out_dir, self.deadline, self.device, self.tiny = step, out_dir, deadline, device, tiny
        self.env = env
        self.rows = os.path.join(out_dir, ROWS)
        self.count = {"ok": 0, "FAIL": 0, "error": 0, "skipped": 0}

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, case: str, status: str, **fields) -> dict:
        row = {"step": self.step, "case": case, "status": status, **fields, **self.env}
        append_row(self.rows, row)
        self.count[status] = self.count.get(status, 0) + 1
        shown = {k: v for k, v in fields.items() if k not in ("traceback",)}
        print(f"smoke {self.step}: {status:7} {case} {json.dumps(shown, default=str)[:300]}", flush=True)
        return row

    def run(self, case: str, fn, min_left: float = 1.0, **fields) -> dict | None:
        """fn() -> dict of result fields (status "ok" unless it sets "status"); an exception is an "error"
        row with its message, and the step goes on. Skipped when less than min_left seconds remain."""
        if self.left() < min_left:
            return self.row(case, "skipped", reason=f"step cap: {self.left():.0f} s left", **fields)
        t0 = time.time()
        try:
            out = fn() or {}
        except Exception as exc:  # a failing case is a row, not the end of the run
            return self.row(case, "error", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                            traceback=traceback.format_exc()[-2000:], seconds=round(time.time() - t0, 2), **fields)
        status = out.pop("status", "ok")
        return self.row(case, status, **{**fields, "seconds": round(time.time() - t0, 2), **out})


def environment(device: str) -> dict:
    """The fields every row carries (benchmarks.harness.environment, plus peft, CUDA and the GPU's arch)."""
    from importlib import metadata

    import torch

    from .harness import environment as base

    env = base(device)
    try:
        env["peft"] = metadata.version("peft")  # (the metadata: importing peft takes seconds)
    except metadata.PackageNotFoundError:
        env["peft"] = None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env.update(cuda=torch.version.cuda, arch=f"sm_{major}{minor}")
    return env


def child_main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one step of the GPU smoke run (run by scripts/gpu_check.py)")
    p.add_argument("--step", required=True)
    p.add_argument("--target", required=True, help="module:function of the step")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True, help="time.time() by which the step must end")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test of the smoke run)")
    args = p.parse_args(argv)
    module, _, name = args.target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    ctx = Context(args.step, args.out, args.deadline, args.device, args.tiny, environment(args.device))
    fn(ctx)
    print(f"smoke {args.step}: done {json.dumps(ctx.count)}", flush=True)
    return 0


def run_steps(steps, budget: float, out_dir: str, log, *, device: str = "cuda", tiny: bool = False,
              inline: dict | None = None, env: dict | None = None, step_env: dict | None = None) -> int:
    """Every step of `steps` ((name, cap seconds, "module:function" or None), in order): a child process with
    deadline min(cap, what is left of `budget`) and the environment variables step_env[name]; `inline` maps
    the None-target steps to functions of the parent (limit seconds -> row fields). A step over its cap is
    killed and recorded as a "timeout" row; a step that would start with under 5 s left is a "skipped" row.
    Returns the number of steps that did not finish."""
    os.makedirs(out_dir, exist_ok=True)
    rows = os.path.join(out_dir, ROWS)
    start = time.time()
    env = env or {}
    unfinished = 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(out_dir, LOG), "a") as logf:
        def say(line: str):
            sys.stdout.write(line)
            sys.stdout.flush()
            logf.write(line)
            logf.flush()

        for name, cap, target in steps:
            left = budget - (time.time() - start)
            if left < 5:
                append_row(rows, {"step": name, "case": "(step)", "status": "skipped",
                                  "reason": f"budget spent ({left:.0f} s left of {budget:.0f})", **env})
                unfinished += 1
                continue
            limit = min(cap, left)
            say(f"smoke: step {name} (cap {cap} s, {limit:.0f} s allowed)\n")
            t0 = time.time()
            if target is None:
                try:
                    fields = inline[name](limit) or {}
                    status = fields.pop("status", "ok")
                except Exception as exc:  # recorded; later steps may still run (or say why not)
                    fields, status = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}, "error"
                    unfinished += 1
                append_row(rows, {"step": name, "case": "(step)", "status": status,
                                  "seconds": round(time.time() - t0, 1), **fields, **env})
                say(f"smoke: step {name}: {status} in {time.time() - t0:.1f} s\n")
                continue
            cmd = [sys.executable, "-m", "benchmarks.smoke", "--step", name, "--target", target, "--out", out_dir,
                   "--deadline", str(t0 + limit - 2), "--device", device] + (["--tiny"] if tiny else [])
            proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1", **(step_env or {}).get(name, {})),
                                    start_new_session=True)
            timed_out = _stream(proc, t0 + limit, say)
            rc = proc.wait()
            status = "timeout" if timed_out else ("ok" if rc == 0 else "error")
            if status != "ok":
                unfinished += 1
                append_row(rows, {"step": name, "case": "(step)", "status": status, "exit_code": rc,
                                  "seconds": round(time.time() - t0, 1), "cap": cap, **env})
            say(f"smoke: step {name}: {status} (exit {rc}) in {time.time() - t0:.1f} s\n")
    return unfinished


def _stream(proc, until: float, say) -> bool:
    """Copies the child's output to the log until it exits; kills its process group at `until`. -> timed out."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        wait = until - time.time()
        if wait <= 0:
            os.killpg(proc.pid, signal.SIGKILL)
            for line in proc.stdout:
                say(line)
            return True
        if sel.select(timeout=min(wait, 1.0)):
            line = proc.stdout.readline()
            if not line:
                return False
            say(line)
        elif proc.poll() is not None:
            for line in proc.stdout:
                say(line)
            return False


if __name__ == "__main__":
    sys.exit(child_main())
