"""benchmarks/README.md from the committed result folders: per device, the latest measurement of every op
(fastnlg vs eager, with the speedup, peak memory and the output check) and the plots, each with its date,
commit and versions. Run after committing a results folder:

    python -m benchmarks.report            # (or fastnlg bench --readme) rewrites benchmarks/README.md
"""
from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_runs(results_dir: str) -> list:
    """Every results.json under results_dir (GPU parts nest one level deeper), as (folder, rows)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "results.json"), recursive=True)):
        with open(path) as f:
            rows = json.load(f)
        if rows:
            runs.append((os.path.dirname(path), rows))
    return runs


def latest_per_device(runs: list) -> dict:
    """{device name: {op: (folder, rows of the latest run that measured the op)}}."""
    out = {}
    for folder, rows in runs:
        for op in sorted({r["op"] for r in rows}):
            op_rows = [r for r in rows if r["op"] == op]
            device = f"{op_rows[0].get('device_name')} ({op_rows[0].get('device')})"
            date = max(r.get("date") or "" for r in op_rows)
            held = out.setdefault(device, {}).get(op)
            if held is None or date > max(r.get("date") or "" for r in held[1]):
                out[device][op] = (folder, op_rows)
    return out


def load_smoke(results_dir: str) -> list:
    """Every smoke.jsonl under results_dir, as (folder, rows); a line cut by a kill is skipped."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "smoke.jsonl"), recursive=True)):
        rows = []
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        if rows:
            runs.append((os.path.dirname(path), rows))
    return runs


def _smoke_figures(row: dict) -> str:
    """The figures a smoke row carries, in a few words: the worst error share, ratios, throughput, memory."""
    parts = []
    if "worst" in row:
        parts.append(f"worst error {row['worst']:.2f} of the bound")
    for mode in ("fwd", "fwd+bwd", None):
        block = row.get(mode) if mode else row
        if not isinstance(block, dict) or "impls" not in block:
            continue
        for name, r in block["impls"].items():
            bits = [f"{r['median_ms']:.3g} ms" if "median_ms" in r else "",
                    f"{r['tflop_per_s']:.0f} TFLOP/s" if r.get("tflop_per_s") else "",
                    f"{r['gb_per_s']:.0f} GB/s" if r.get("gb_per_s") else "",
                    f"{r['tokens_per_s']} tok/s" if r.get("tokens_per_s") else "",
                    f"peak {r['peak_mb']:.0f} MB" if r.get("peak_mb") == r.get("peak_mb") and "peak_mb" in r else "",
                    f"{r['ratio']:.2f}x [{r['ratio_p20']:.2f}-{r['ratio_p80']:.2f}] vs {block['baseline']}"
                    if "ratio" in r else ""]
            parts.append(f"{(mode + ' ') if mode else ''}{name}: " + ", ".join(b for b in bits if b))
    for key in ("error", "reason", "unexpected"):
        if row.get(key):
            parts.append(f"{key}: {str(row[key])[:160]}")
    return "; ".join(parts).replace("|", "/")


def render_smoke(results_dir: str) -> list:
    lines = []
    for folder, rows in load_smoke(results_dir):
        r0 = next((r for r in rows if r.get("date")), rows[0])
        rel = os.path.relpath(folder, HERE)
        lines += [f"## GPU smoke run: {r0.get('device_name')} ({r0.get('arch', r0.get('device'))})", "",
                  f"{r0.get('date')}, commit {r0.get('commit')}; torch {r0.get('torch')}, triton {r0.get('triton')}, "
                  f"transformers {r0.get('transformers')}, CUDA {r0.get('cuda')}; [{rel}]({rel}/smoke.jsonl)", "",
                  "| step | case | dtype | status | figures |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.get('step')} | {r.get('case')} | {r.get('dtype', '')} | {r.get('status')} | "
                         f"{_smoke_figures(r)} |")
        lines.append("")
    return lines


def _fmt(v, spec):
    return "" if v is None or v != v else format(v, spec)


def speedup_text(row: dict) -> str:
    """A row's side-by-side ratio to eager with its spread; runs from before the harness timed side by side have
    none, and get no ratio (their two times were taken one after the other)."""
    if row.get("ratio") is None or row["ratio"] != row["ratio"]:
        return "n/a (not side by side)" if row.get("median_ms") == row.get("median_ms") else ""
    from .harness import Row

    fields = {k: row.get(k) for k in ("ratio", "ratio_p20", "ratio_p80")}
    return Row("", "", "", "", "", 0.0, 0.0, 0.0, None, None, None, 0.0, **fields).speedup()


def render(results_dir: str) -> str:
    latest = latest_per_device(load_runs(results_dir))
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report` from the folders in `results/` (do not edit by hand).",
             "Each table is the latest run of that op on that device; times are medians; speedup = eager time / fastnlg",
             "time per side-by-side round (both timed alternately in one process), the median [p20-p80]; runs",
             "from before side-by-side timing show no speedup, because their two times were taken one after the other;",
             "and every output was checked against its fp64 spec before it was timed (`check`).", "",
             "GPU smoke runs (`python3 scripts/gpu_check.py --part smoke --budget 420 --export \"$OUT\"`, the first",
             "command on a lent GPU) are listed first: one row per check or timing from `smoke.jsonl`, in the order",
             "of the SMOKE table in scripts/gpu_check.py (correctness against the fp64 spec by the tolerance rule,",
             "a patched Llama against unpatched, timings side by side with the ratio's p20-p80 spread).", ""]
    lines += render_smoke(results_dir)
    if not latest:
        return "\n".join(lines + ["No results committed yet.", ""])
    for device in sorted(latest):
        lines += [f"## {device}", ""]
        for op, (folder, rows) in sorted(latest[device].items()):
            r0 = rows[0]
            rel = os.path.relpath(folder, HERE)
            lines += [f"### {op}", "",
                      f"{r0.get('date')}, commit {r0.get('commit')}; torch {r0.get('torch')}, triton {r0.get('triton')}, "
                      f"transformers {r0.get('transformers')}; [{rel}]({rel}/summary.md)", "",
                      "| case | dtype | mode | fastnlg ms | eager ms | speedup | fastnlg peak MB | eager peak MB | check |",
                      "|---|---|---|---|---|---|---|---|---|"]
            by = {(r["case"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
            for case, dtype, mode in dict.fromkeys((r["case"], r["dtype"], r["mode"]) for r in rows):
                ours = by.get((case, dtype, mode, "fastnlg")) or next(
                    (r for (c, d, m, i), r in by.items() if (c, d, m) == (case, dtype, mode) and i.startswith("fastnlg")),
                    None)
                base = by.get((case, dtype, mode, "eager"))
                if ours is None:
                    continue
                speed = speedup_text(ours)
                lines.append(f"| {case} | {dtype} | {mode} | {_fmt(ours['median_ms'], '.3f')} | "
                             f"{_fmt(base and base['median_ms'], '.3f')} | {speed} | "
                             f"{_fmt(ours.get('peak_mem_mb'), '.1f')} | {_fmt(base and base.get('peak_mem_mb'), '.1f')} | "
                             f"{ours.get('check', '')} |")
            plot = os.path.join(folder, f"{op}.png")
            if os.path.exists(plot):
                lines += ["", f"![{op}]({os.path.relpath(plot, HERE)})"]
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=os.path.join(HERE, "README.md"))
    args = p.parse_args(argv)
    text = render(args.results)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
