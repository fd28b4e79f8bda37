"""Run the op benchmarks and write a report.

    python -m benchmarks.run                      # every op, quick sizes on CPU, full sweep on CUDA
    python -m benchmarks.run --ops rms_norm --dtype bf16 --out benchmarks/results/<name>

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

from benchmarks.harness import run_benchmarks, write_report

OPS = {"rms_norm": "bench_rms_norm", "layer_norm": "bench_layer_norm", "swiglu": "bench_glu",
       "geglu": "bench_glu:GEGLU", "rope": "bench_rope",
       "cross_entropy": "bench_cross_entropy", "fused_linear_cross_entropy": "bench_fused_linear_cross_entropy",
       "attention": "bench_attention", "attention_decode": "bench_attention_decode", "lora_linear": "bench_lora_linear",
       "nf4": "bench_nf4", "train_step": "bench_train_step"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def available_ops():
    return [op for op, mod in OPS.items() if importlib.util.find_spec(f"benchmarks.{mod.split(':')[0]}") is not None]


def load_bench(op: str):
    """The Bench of `op` (OPS values are "module" for its BENCH, or "module:NAME")."""
    module, _, name = OPS[op].partition(":")
    return getattr(importlib.import_module(f"benchmarks.{module}"), name or "BENCH")


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
    p.add_argument("--ops", nargs="+", default=["all"], help=f"any of: {', '.join(OPS)} (default all)")
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
    ops = available_ops() if args.ops == ["all"] else args.ops
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
    paths = write_report(rows, out, title=f"fastnlg op benchmarks ({device}, {str(dtype).replace('torch.', '')})")
    _write_tuned_configs(out)
    print(f"\n{len(rows)} measurements -> {paths['md']}, {paths['csv']}, {paths['json']}, plots: {len(paths['plots'])}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
