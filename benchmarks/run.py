"""Run the op benchmarks and write a report.

    fastnlg bench                                 # (= python -m benchmarks.run in a checkout) every op and the
                                                  # training step, quick sizes on CPU, full sweep on CUDA
    fastnlg bench --suite e2e                     # the training step only (--suite ops: the op benchmarks)
    fastnlg bench --ops rms_norm --dtype bf16 --out benchmarks/results/<name>
    fastnlg bench --compare benchmarks/results/<earlier>    # speedups against an earlier run's, regressions flagged

On CPU the sizes are small (so CI exercises the harness) and torch.compile is left out unless asked for
with --impls (inductor's CPU compile of every shape takes minutes).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import sys

import torch

from .harness import run_benchmarks, write_report
from .report import speedup_text

OPS = {"rms_norm": "bench_rms_norm", "layer_norm": "bench_layer_norm", "add_layer_norm": "bench_add_layer_norm",
       "swiglu": "bench_glu",
       "geglu": "bench_glu:GEGLU", "gelu": "bench_gelu", "rope": "bench_rope",
       "cross_entropy": "bench_cross_entropy", "fused_linear_cross_entropy": "bench_fused_linear_cross_entropy",
       "fused_linear_logprobs": "bench_fused_linear_logprobs",
       "fused_linear_distillation_loss": "bench_fused_linear_distillation_loss",
       "attention": "bench_attention", "attention_decode": "bench_attention_decode",
       "relative_position_attention": "bench_relative_position_attention", "lora_linear": "bench_lora_linear",
       "nf4": "bench_nf4", "train_step": "bench_train_step"}
E2E = ("train_step",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def available_ops():
    return [op for op, mod in OPS.items() if importlib.util.find_spec(f"{__package__}.{mod.split(':')[0]}") is not None]


def load_bench(op: str):
    """The Bench of `op` (OPS values are "module" for its BENCH, or "module:NAME")."""
    module, _, name = OPS[op].partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), name or "BENCH")


def _write_tuned_configs(out: str) -> None:
    """The tile configs the kernels measured fastest on this device, per problem key (kernels/_autotune.py)."""
    from fastnlg.kernels import _autotune

    chosen = _autotune.chosen()
    if chosen:
        with open(os.path.join(out, "tuned_configs.json"), "w") as f:
            json.dump([{"key": [str(part) for part in key], "config": list(cfg)} for key, cfg in chosen.items()],
                      f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("ops", "e2e", "all"), default="all",
                   help="ops: the op benchmarks; e2e: the training step (train_step); all: both (default)")
    p.add_argument("--ops", nargs="+", default=None, help=f"any of: {', '.join(OPS)} (instead of --suite)")
    p.add_argument("--compare", metavar="DIR", help="an earlier run's report folder: "
                   "each speedup vs eager against its own there, regressions (fell by > 10%% with the spreads apart, "
                   "or now failing) flagged in compare.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", default=None, help="small sizes (default on CPU)")
    p.add_argument("--full", dest="quick", action="store_false", help="the full sweep (default on CUDA)")
    p.add_argument("--impls", nargs="+", help="only these implementations (fastnlg, eager, torch.compile, ...)")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--out", default=None, help="report folder (default benchmarks/out/<date>)")
    args = p.parse_args(argv)

    device = args.device
    quick = (device == "cpu") if args.quick is None else args.quick
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    impls = args.impls  # None: every implementation on CUDA; on CPU fastnlg's own and eager (see docstring)
    if args.ops:
        ops = args.ops
    else:
        ops = [o for o in available_ops() if args.suite == "all" or (o in E2E) == (args.suite == "e2e")]
    if args.compare and not os.path.isfile(os.path.join(args.compare, "results.json")):
        p.error(f"--compare {args.compare}: no results.json there")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; known: {', '.join(OPS)}")
    rep = args.rep or (20 if device == "cuda" else 5)
    out = args.out or os.path.join("benchmarks", "out", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    rows = []
    for op in ops:
        bench = load_bench(op)
        print(f"{op} on {device} ({dtype}, {'quick' if quick else 'full'} sweep)")
        chosen = impls or (None if device == "cuda" else [n for n in bench.impls if n.startswith("fastnlg") or n == "eager"])
        rows += run_benchmarks(bench, device=device, dtype=dtype, quick=quick, impls=chosen, rep=rep,
                               warmup=3 if device == "cuda" else 1)
    paths = write_report(rows, out, title=f"fastnlg benchmarks ({device}, {str(dtype).replace('torch.', '')})")
    if any(r.op in E2E for r in rows):
        from .bench_train_step import targets_markdown

        with open(paths["md"], "a") as f:
            f.write("\n" + targets_markdown(rows))
    _write_tuned_configs(out)
    print(f"\n{len(rows)} measurements -> {paths['md']}, {paths['csv']}, {paths['json']}, plots: {len(paths['plots'])}")
    if args.compare:
        text, regressions = compare(rows, args.compare)
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(text)
        print(f"compared with {args.compare}: {len(regressions)} regression(s) -> {os.path.join(out, 'compare.md')}")
        for line in regressions:
            print("  " + line)
    return 0 if rows else 1


def compare(rows, earlier_dir: str, slower: float = 1.10):
    """(markdown table, [regression lines]) of this run against an earlier one. Two runs made at different times
    saw different loads, so their times are not divided: what is compared is each implementation's ratio to eager,
    which each run measured side by side. A regression is a ratio that fell by more than `slower` with the two
    runs' p20-p80 spreads apart, or an output check that now fails; an earlier run without side-by-side ratios
    can only show the check."""
    with open(os.path.join(earlier_dir, "results.json")) as f:
        old = {(r["op"], r["impl"], r["case"], r["dtype"], r["mode"]): r for r in json.load(f)}
    lines = [f"# Compared with {earlier_dir}", "",
             "Speedup = eager time / this implementation's, measured side by side within each run (median "
             "[p20-p80]); the two runs' times are not divided by each other (they saw different loads).", "",
             "| op | case | dtype | mode | impl | earlier speedup | now speedup | |", "|---|---|---|---|---|---|---|---|"]
    regressions = []
    for r in rows:
        key = (r.op, r.impl, r.case, r.dtype, r.mode)
        before = old.get(key)
        if before is None or r.impl == "eager":
            continue
        now_fail, was_fail = r.check.startswith("FAIL"), str(before.get("check", "")).startswith("FAIL")
        was = before.get("ratio")
        fell = (r.ratio is not None and was is not None and was == was and r.ratio * slower < was
                and r.ratio_p80 < before["ratio_p20"])
        flag = "REGRESSION: now FAIL" if now_fail and not was_fail else ("REGRESSION" if fell else "")
        if flag:
            regressions.append(f"{flag}: {' '.join(map(str, key))}"
                               + (f" speedup {was:.2f}x -> {r.ratio:.2f}x" if fell else ""))
        lines.append(f"| {r.op} | {r.case} | {r.dtype} | {r.mode} | {r.impl} | {speedup_text(before)} | {r.speedup()} | "
                     f"{flag} |")
    return "\n".join(lines) + "\n", regressions


if __name__ == "__main__":
    sys.exit(main())
