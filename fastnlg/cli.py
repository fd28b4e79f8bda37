"""The `fastnlg` command.

    fastnlg demo     the op benchmarks on small sizes with a report (until the trainer lands)
    fastnlg bench    the benchmark suite (python -m benchmarks.run options; run from the repo root)
    fastnlg aot      the ahead-of-time compile check of every Triton kernel for sm_80/86/89/90
"""
from __future__ import annotations

import argparse
import os
import sys


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmarks(argv):
    root = _repo_root()
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        raise SystemExit("fastnlg bench/demo run from a source checkout (benchmarks/ is not installed)")
    sys.path.insert(0, root)
    from benchmarks.run import main as run

    return run(argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastnlg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="quick op benchmarks against eager PyTorch, with a report")
    sub.add_parser("bench", help="benchmark suite; extra options go to benchmarks.run", add_help=False)
    sub.add_parser("aot", help="AOT compile check of every Triton kernel", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "demo":
        out = os.path.join(_repo_root(), "benchmarks", "out", "demo")
        rc = _benchmarks(["--quick", "--out", out] + rest)
        print(f"\nReport: {os.path.join(out, 'summary.md')}")
        return rc
    if args.cmd == "bench":
        return _benchmarks(rest)
    from fastnlg.aot import main as aot_main

    return aot_main(rest)


if __name__ == "__main__":
    sys.exit(main())
