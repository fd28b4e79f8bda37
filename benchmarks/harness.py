"""Shared benchmark harness (DESIGN.md §4.8): time (median, p20, p80), peak memory and achieved GB/s or
TFLOP/s for each implementation of an op, with rows that carry device, versions, date and commit.

An op script supplies a `Bench`: its cases, how to build inputs, the implementations to compare and the
bytes (or FLOPs) each mode moves. `run_benchmarks` measures, `write_report` writes CSV, JSON, a markdown
summary and a plot.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .peers import NotInstalled
from .side_by_side import Ratio, compare


@dataclass
class Case:
    label: str            # e.g. "N=4096,C=4096"
    params: dict          # passed to make_inputs and bytes_moved
    x: float              # the value on the plot's x axis


@dataclass
class Bench:
    op: str
    cases: Callable[[bool, str], list]                 # (quick, device) -> [Case]
    make_inputs: Callable[[dict, str, torch.dtype], dict]
    impls: dict                                        # name -> fn(**inputs) -> tensor (or loss)
    bytes_moved: Callable[[dict, torch.dtype, str], float] | None = None   # (params, dtype, mode) -> bytes
    flops: Callable[[dict, str], float] | None = None  # (params, mode) -> FLOPs
    modes: tuple = ("fwd", "fwd+bwd")  # or ("step",): fn runs a whole training step itself
    x_label: str = "hidden size C"
    tokens: Callable[[dict], int] | None = None  # params -> tokens one call processes (reports tokens/s)
    references: dict = field(default_factory=dict)  # impl name -> the function that is its spec (default: eager)


@dataclass
class Row:
    op: str
    impl: str
    case: str
    dtype: str
    mode: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float | None
    gb_per_s: float | None
    tflop_per_s: float | None
    x: float
    env: dict = field(default_factory=dict)
    tokens_per_s: float | None = None
    check: str = ""  # "ok", "FAIL: ..." or a peer's "not installed (...)" (then no time: NaN), "" (a training step)
    ratio: float | None = None      # eager time / this one's, per side-by-side round: the median (None for eager)
    ratio_p20: float | None = None  # and its p20-p80 spread
    ratio_p80: float | None = None

    def speedup(self) -> str:
        """The ratio to eager with its spread, and a word when the spread is too wide to conclude ("" if none)."""
        if self.ratio is None:
            return ""
        r = Ratio(self.ratio, self.ratio_p20, self.ratio_p80, 0)
        text = f"{r.median:.2f}x [{r.p20:.2f}–{r.p80:.2f}]"
        return text + (" inconclusive" if r.verdict().startswith("inconclusive") else "")


COMMIT_FILE = ".fastnlg-commit"  # at the repository root: the commit, where the copy has no .git (a device)


def source_commit() -> str | None:
    """The checkout's commit: git's, else $FASTNLG_COMMIT, else the COMMIT_FILE written beside the copy (the
    device tool sends the working tree without .git: `git rev-parse --short HEAD > .fastnlg-commit` first)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    if os.environ.get("FASTNLG_COMMIT"):
        return os.environ["FASTNLG_COMMIT"]
    try:
        with open(os.path.join(root, COMMIT_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def environment(device: str) -> dict:
    def version(dist):
        """The installed version, read from the package metadata (importing transformers or peft only to read
        it costs seconds, which a capped smoke step cannot spare)."""
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    commit = source_commit()
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
            "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit}


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _fix_malloc_mmap_threshold():
    """glibc raises its mmap threshold after large frees and then recycles freed blocks inside the heap,
    which hides new allocations from the resident-set peak. A fixed threshold keeps large tensors mmap'd."""
    try:
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except AttributeError:
        pass


def _release_free_heap():
    """Returns the free memory glibc still holds inside its heaps (blocks freed before the threshold above was
    set, or in another thread's arena) to the system: a block reused from there is already resident and would
    not show in the resident-set peak (seen: a test's eager N x V logits measured at 1x instead of 3x after
    earlier tests had freed a large block)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


_fix_malloc_mmap_threshold()


def peak_memory_mb(fn, device: str) -> float | None:
    """Peak memory one call of fn allocates above what was live before it.
    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set, reset through
    /proc/self/clear_refs (large tensors are mmap'd and returned to the OS when freed)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS:")
        fn()
        return max(0, _rss_kb("VmHWM:") - base) / 1024
    except OSError:
        return None


def _step(fn, inputs, mode):
    """A zero-argument callable running one fwd (or fwd+bwd) of fn on fresh grads, or one call of fn
    (mode "step": fn runs forward, backward and the optimizer itself)."""
    if mode == "step":
        return lambda: fn(**inputs)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(**inputs)
        return run
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        out = fn(**inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _fp64(inputs: dict) -> dict:
    """Detached fp64 copies of the floating tensors (others as they are: labels, NF4 weights, options)."""
    return {k: v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def check_output(bench: Bench, name: str, fn, inputs: dict, dtype) -> str:
    """The DESIGN tolerance rule on the forward output before anything is timed:
    max|ours - ref64| <= 2 max|spec_lowp - ref64| + atol, where the spec is the impl's reference function
    (eager unless the bench names another), ref64 the spec on fp64 copies and spec_lowp the spec on the
    inputs themselves. "ok", or "FAIL: ..." with the errors."""
    spec = bench.references.get(name, bench.impls.get("eager"))
    if spec is None:
        return "ok (no reference)"
    with torch.no_grad():
        ours = _as_tuple(fn(**inputs))
        ref = _as_tuple(spec(**_fp64(inputs)))
        low = _as_tuple(spec(**inputs))
    for i, (o, r, lo) in enumerate(zip(ours, ref, low)):
        o, r, lo = o.double(), r.to(o.device).double(), lo.double()
        if o.shape != r.shape:
            return f"FAIL: output {i} has shape {tuple(o.shape)}, the reference {tuple(r.shape)}"
        err, bound = (o - r).abs().max().item(), 2 * (lo - r).abs().max().item()
        bound += _ATOL.get(dtype, 1e-5) * max(1.0, r.abs().max().item())
        if not err <= bound:  # also catches NaN
            return f"FAIL: output {i} max error {err:.3g} > bound {bound:.3g}"
    return "ok"


BASELINE = "eager"  # the implementation every ratio is taken against


def _nan_rows(bench: Bench, name: str, case: Case, dtype, modes, env: dict, why: str) -> list:
    nan = float("nan")
    return [Row(bench.op, name, case.label, str(dtype).replace("torch.", ""), mode, nan, nan, nan, None, None, None,
                case.x, env, None, why) for mode in modes]


def run_benchmarks(bench: Bench, *, device: str, dtype: torch.dtype, quick: bool, impls=None,
                   warmup: int = 3, rep: int = 10, log=print) -> list[Row]:
    """Per case: every implementation's output checked against its spec, then per mode the implementations that
    passed timed side by side (benchmarks/side_by_side.py: one call of each per round, in rotating order, `rep`
    rounds after `warmup`), so that each row's ratio to eager (eager time / its time, per round: the median and
    p20-p80) compares the implementations at the same moments of the machine; peak memory per implementation."""
    env = environment(device)
    rows = []
    for case in bench.cases(quick, device):
        inputs = bench.make_inputs(case.params, device, dtype)
        passed = {}
        for name, fn in bench.impls.items():
            if impls and name not in impls:
                continue
            verdict = ""
            if "step" not in bench.modes:
                try:
                    verdict = check_output(bench, name, fn, inputs, dtype)
                except NotInstalled as exc:  # a peer that cannot run here: a row that says so
                    verdict = str(exc)
                except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                    verdict = f"ok (reference not run in fp64: {type(exc).__name__})"
            if not verdict.startswith("ok") and verdict:
                log(f"  {bench.op} {name} {case.label}: {verdict}")
                rows += _nan_rows(bench, name, case, dtype, bench.modes, env, verdict)
                continue
            passed[name] = (fn, verdict)
        for mode in bench.modes:
            steps, peaks = {}, {}
            for name, (fn, _) in passed.items():
                step = _step(fn, inputs, mode)
                try:
                    peaks[name] = peak_memory_mb(step, device)  # also the first call: a peer or an OOM fails here
                except NotInstalled as exc:  # a peer that cannot run here (found only when it runs)
                    rows += _nan_rows(bench, name, case, dtype, (mode,), env, str(exc))
                    continue
                except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. OOM: report, go on
                    log(f"  {bench.op} {name} {case.label} {mode}: skipped ({type(exc).__name__}: {exc})")
                    continue
                steps[name] = step
            if not steps:
                continue
            base = BASELINE if BASELINE in steps else next(iter(steps))
            result = compare(steps, device=device, baseline=base, rounds=rep, warmup=max(warmup - 1, 0))
            for name in steps:
                t, peak = result.ms[name], peaks[name]
                ratio = result.ratio(name) if name != BASELINE and base == BASELINE else None
                nbytes = bench.bytes_moved(case.params, dtype, mode) if bench.bytes_moved else None
                nflops = bench.flops(case.params, mode) if bench.flops else None
                row = Row(bench.op, name, case.label, str(dtype).replace("torch.", ""), mode, t.median, t.p20, t.p80,
                          peak, nbytes / (t.median * 1e-3) / 1e9 if nbytes else None,
                          nflops / (t.median * 1e-3) / 1e12 if nflops else None, case.x, env,
                          bench.tokens(case.params) / (t.median * 1e-3) if bench.tokens else None, passed[name][1],
                          ratio and ratio.median, ratio and ratio.p20, ratio and ratio.p80)
                rows.append(row)
                log(f"  {bench.op:24} {name:14} {case.label:24} {mode:8} {t.median:9.3f} ms  "
                    + (f"{row.gb_per_s:8.1f} GB/s  " if row.gb_per_s else "")
                    + (f"{row.tflop_per_s:7.2f} TFLOP/s  " if row.tflop_per_s else "")
                    + (f"{row.tokens_per_s:9.0f} tokens/s  " if row.tokens_per_s else "")
                    + (f"peak {peak:9.1f} MB  " if peak is not None else "")
                    + (f"{ratio} vs eager" if ratio else ""))
        del inputs
    return rows


def write_report(rows: list[Row], out_dir: str, title: str = "fastnlg benchmarks") -> dict:
    """CSV + JSON (one row per measurement, env flattened in) + markdown summary + PNG plot per op."""
    os.makedirs(out_dir, exist_ok=True)
    flat = [{**{k: v for k, v in asdict(r).items() if k != "env"}, **r.env} for r in rows]
    paths = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json"),
             "md": os.path.join(out_dir, "summary.md")}
    if flat:
        with open(paths["csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
    with open(paths["json"], "w") as f:
        json.dump(flat, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown_summary(rows, title))
    paths["plots"] = _plots(rows, out_dir)
    return paths


def markdown_summary(rows: list[Row], title: str) -> str:
    if not rows:
        return f"# {title}\n\nNo measurements.\n"
    env = rows[0].env
    out = [f"# {title}", "", f"Device: {env['device_name']} ({env['device']}, {env['cpu_threads']} CPU threads); "
           f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
           f"{env['date']}; commit {env['commit']}.", "",
           "Times are medians over repetitions (p20–p80 in brackets). The implementations of a case ran side by "
           "side (one call of each per round, in rotating order); speedup is eager time / its time per round, the "
           "median [p20–p80], \"inconclusive\" where that spread includes 1 or is wider than 25% of it.", ""]
    ops = sorted({r.op for r in rows})
    for op in ops:
        op_rows = [r for r in rows if r.op == op]
        tok = any(r.tokens_per_s for r in op_rows)
        out += [f"## {op}", "", "| case | dtype | mode | impl | time ms [p20–p80] | GB/s | TFLOP/s | "
                + ("tokens/s | " if tok else "") + "peak MB | speedup vs eager | output check |",
                "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tok else "")]
        for r in op_rows:
            if r.median_ms != r.median_ms:  # NaN: failed its output check, or a peer that cannot run here
                what = "FAIL (no time recorded)" if r.check.startswith("FAIL") else "not run"
                out.append(f"| {r.case} | {r.dtype} | {r.mode} | {r.impl} | {what} | | | "
                           + ("| " if tok else "") + f"| | {r.check} |")
                continue
            out.append(f"| {r.case} | {r.dtype} | {r.mode} | {r.impl} | {r.median_ms:.3f} [{r.p20_ms:.3f}–{r.p80_ms:.3f}] | "
                       f"{'' if r.gb_per_s is None else f'{r.gb_per_s:.1f}'} | "
                       f"{'' if r.tflop_per_s is None else f'{r.tflop_per_s:.2f}'} | "
                       + (f"{r.tokens_per_s:.0f} | " if tok else "") +
                       f"{'' if r.peak_mem_mb is None else f'{r.peak_mem_mb:.1f}'} | {r.speedup()} | {r.check} |")
        out.append("")
    return "\n".join(out)


def _plots(rows: list[Row], out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for op in sorted({r.op for r in rows}):
        op_rows = [r for r in rows if r.op == op]
        modes = sorted({r.mode for r in op_rows})
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for impl in sorted({r.impl for r in op_rows}):
                pts = sorted((r.x, r.median_ms) for r in op_rows if r.impl == impl and r.mode == mode
                             and r.median_ms == r.median_ms)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set(title=f"{op} {mode}", xlabel=op_rows[0].case.split(",")[-1].split("=")[0] if op_rows else "",
                   ylabel="median ms", xscale="log", yscale="log")
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
