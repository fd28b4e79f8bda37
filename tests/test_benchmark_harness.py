"""The benchmark harness runs on CPU and writes its report (CSV, JSON, markdown, plot)."""
import csv
import json
import os

import torch

from benchmarks.bench_rms_norm import BENCH
from benchmarks.harness import Case, run_benchmarks, write_report


def test_harness_writes_report(tmp_path, monkeypatch):
    monkeypatch.setattr(BENCH, "cases", lambda quick, device: [Case("N=64,C=256", {"N": 64, "C": 256}, 256)])
    rows = run_benchmarks(BENCH, device="cpu", dtype=torch.float32, quick=True, impls=["fastnlg", "eager"], rep=3,
                          warmup=1, log=lambda *_: None)
    assert {(r.impl, r.mode) for r in rows} == {(i, m) for i in ("fastnlg", "eager") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r.p20_ms <= r.median_ms <= r.p80_ms and r.gb_per_s > 0
        assert r.env["torch"] == torch.__version__ and r.env["date"]
        assert (r.ratio is None) == (r.impl == "eager")
        assert r.impl == "eager" or r.ratio_p20 <= r.ratio <= r.ratio_p80
    paths = write_report(rows, str(tmp_path))
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 4
    assert len(json.load(open(paths["json"]))) == 4
    md = open(paths["md"]).read()
    assert "| N=64,C=256 | float32 | fwd+bwd | fastnlg |" in md and "speedup vs eager" in md
    ours = next(r for r in rows if r.impl == "fastnlg" and r.mode == "fwd")
    assert f"| {ours.speedup()} |" in md and ours.speedup().startswith(f"{ours.ratio:.2f}x [")
    assert paths["plots"] and all(p.endswith(".png") for p in paths["plots"])


def test_harness_times_the_implementations_side_by_side():
    """The implementations of a case are timed alternately (one call each per round, rotating), not one after the
    other: a change in the machine's load between two sequential loops would be in their ratio."""
    from benchmarks.harness import Bench

    calls = []

    def impl(name):
        def fn(x):
            calls.append(name)
            return x * 2
        return fn

    bench = Bench("toy", lambda quick, device: [Case("N=8", {"N": 8}, 8)],
                  lambda p, device, dtype: {"x": torch.randn(p["N"], dtype=dtype)},
                  {"fastnlg": impl("fastnlg"), "eager": impl("eager"), "other": impl("other")}, modes=("fwd",),
                  references={"fastnlg": lambda x: x * 2, "other": lambda x: x * 2})
    rows = run_benchmarks(bench, device="cpu", dtype=torch.float32, quick=True, rep=9, warmup=1, log=lambda *_: None)
    timed = calls[-27:]  # the 9 timed rounds of 3 implementations
    assert all(sorted(timed[i:i + 3]) == ["eager", "fastnlg", "other"] for i in range(0, 27, 3)), timed
    assert len({tuple(timed[i:i + 3]) for i in range(0, 27, 3)}) == 3  # the order rotates
    by = {r.impl: r for r in rows}
    assert by["eager"].ratio is None and by["fastnlg"].ratio > 0 and by["other"].ratio > 0


def test_every_op_has_a_benchmark():
    """Every op fastnlg.ops exports (and NF4) has a benchmark that times fastnlg's own implementation of it."""
    import fastnlg.ops
    from benchmarks.run import OPS, available_ops, load_bench

    assert available_ops() == list(OPS)
    named = {"apply_rope": "rope", "flash_attention": "attention"}
    for op in [*fastnlg.ops.__all__, "nf4"]:
        bench = named.get(op, op)
        assert bench in OPS, f"{op} has no benchmark"
        impls = load_bench(bench).impls
        assert "fastnlg" in impls or any(k.startswith("fastnlg") for k in impls), op
    assert load_bench("geglu").impls["fastnlg"] is fastnlg.ops.geglu


def test_loss_benchmarks_compare_equal_losses():
    """The implementations a loss benchmark times compute the same loss (so the timings compare like with like)."""
    from benchmarks import bench_cross_entropy, bench_fused_linear_cross_entropy
    from benchmarks.peers import NotInstalled

    for bench, params in ((bench_cross_entropy.BENCH, {"N": 16, "V": 300}),
                          (bench_fused_linear_cross_entropy.BENCH, {"N": 16, "V": 300, "C": 32})):
        inputs = bench.make_inputs(params, "cpu", torch.float32)
        losses = {}
        for name, fn in bench.impls.items():
            if name == "torch.compile":
                continue
            try:
                losses[name] = fn(**inputs)
            except NotInstalled:  # a peer that cannot run here
                pass
        assert len(losses) >= 2
        for name, loss in losses.items():
            torch.testing.assert_close(loss, losses["eager"], rtol=1e-5, atol=1e-5, msg=name)


def test_train_step_benchmark_times_the_same_step(monkeypatch, backend_env):
    """fastnlg vs eager in the step benchmark: the same model, batch and method (equal first-step losses,
    LoRA's B starting at zero), and the report carries tokens/s."""
    backend_env.setenv("TRITON_INTERPRET", "0")
    from benchmarks import bench_train_step as b

    small = dict(hidden=32, layers=2, heads=4, kv=2, inter=64, vocab=128, batch=2, seq=16)
    for method in ("full", "lora"):
        step = b.Step({**small, "method": method, "size": "test"}, "cpu", torch.float32)
        losses = [float(step(impl)) for impl in ("fastnlg", "eager", "hf-eager-attention")]
        step.free()
        assert max(losses) - min(losses) < 1e-4, (method, losses)
    monkeypatch.setattr(b, "SIZES", {**b.SIZES, "small": small})
    rows = run_benchmarks(b.BENCH, device="cpu", dtype=torch.float32, quick=True, rep=2, warmup=1,
                          impls=["fastnlg", "eager", "liger"], log=lambda *_: None)
    timed = [r for r in rows if r.impl != "liger"]
    assert {r.impl for r in timed} == {"fastnlg", "eager"} and len(timed) == 2 * len(b.METHODS)
    assert all(r.mode == "step" and r.tokens_per_s > 0 and r.tflop_per_s > 0 for r in timed)
    liger = [r for r in rows if r.impl == "liger"]  # not installed here (or no CUDA): a row that says so
    assert len(liger) == len(b.METHODS) and all(r.check.startswith(("not installed", "not run")) for r in liger)
    md = b.targets_markdown(rows)
    assert md.count("| full,small,4x256 |") == 1 and ("met" in md or "BELOW TARGET" in md)


def test_a_wrong_result_is_reported_as_fail_not_as_a_time(tmp_path, monkeypatch):
    """Each impl's forward output is checked by the DESIGN rule against the fp64 spec before it is timed."""
    from benchmarks.harness import Bench
    from benchmarks.peers import missing

    def eager(x):
        return torch.softmax(x, -1)

    def off_by_a_bit(x):
        return torch.softmax(x, -1) * (1 + 1e-3)

    bench = Bench("toy", lambda quick, device: [Case("N=8", {"N": 8}, 8)],
                  lambda p, device, dtype: {"x": torch.randn(p["N"], 64, dtype=dtype, requires_grad=True)},
                  {"fastnlg": off_by_a_bit, "eager": eager, "fine": lambda x: torch.softmax(x.double(), -1).float(),
                   "peer": missing("not installed (some_peer)")})
    rows = run_benchmarks(bench, device="cpu", dtype=torch.float32, quick=True, rep=2, warmup=1, log=lambda *_: None)
    by = {(r.impl, r.mode): r for r in rows}
    assert by[("fastnlg", "fwd")].check.startswith("FAIL") and by[("fastnlg", "fwd")].median_ms != by[("fastnlg", "fwd")].median_ms
    assert by[("eager", "fwd")].check == "ok" and by[("fine", "fwd+bwd")].check == "ok"
    md = open(write_report(rows, str(tmp_path))["md"]).read()
    assert "| fastnlg | FAIL (no time recorded) |" in md
    assert by[("peer", "fwd")].check == "not installed (some_peer)" and "| peer | not run |" in md


def test_compare_flags_regressions(tmp_path):
    """--compare sets each implementation's side-by-side speedup against the earlier run's, never the two runs'
    times against each other: a regression is a speedup that fell by > 10% with the spreads apart, or a new FAIL."""
    from benchmarks.harness import Row, environment
    from benchmarks.run import compare

    env = environment("cpu")

    def row(impl, ratio, spread=0.05, check="ok", ms=1.0):
        r = (None, None, None) if ratio is None else (ratio, ratio - spread, ratio + spread)
        return Row("rms_norm", impl, "N=1,C=2", "float32", "fwd", ms, ms, ms, None, None, None, 2.0, env, None, check,
                   *r)

    write_report([row("fastnlg", 2.0), row("eager", None), row("torch.compile", 1.2), row("liger", 1.5)],
                 str(tmp_path / "old"))
    now = [row("fastnlg", 1.5, ms=0.1), row("eager", None, ms=50.0), row("liger", 1.45, spread=0.3),
           row("torch.compile", float("nan"), check="FAIL: x")]
    text, regressions = compare(now, str(tmp_path / "old"))
    assert len(regressions) == 2, regressions  # liger's fall is within 10% and its spread overlaps
    assert "speedup 2.00x -> 1.50x" in regressions[0] and "now FAIL" in regressions[1]
    assert "| rms_norm | N=1,C=2 | float32 | fwd | fastnlg | 2.00x [1.95–2.05] | 1.50x [1.45–1.55] | REGRESSION |" in text
    assert "eager |" not in text  # eager has no ratio to itself


def test_pytest_benchmark_integration_collects_every_op():
    import os
    import subprocess
    import sys

    from benchmarks.run import E2E, OPS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    ids = [line for line in r.stdout.splitlines() if "::test_op[" in line]
    assert {i.split("[", 1)[1].split("-", 1)[0] for i in ids} == {op for op in OPS if op not in E2E}


def test_benchmarks_readme_is_regenerated_from_the_results():
    """benchmarks/README.md is what `python -m benchmarks.report` makes of the committed results folders."""
    import os

    from benchmarks import report

    here = os.path.dirname(report.__file__)
    assert open(os.path.join(here, "README.md")).read() == report.render(os.path.join(here, "results")), \
        "run python -m benchmarks.report after adding results"


def test_report_keeps_the_latest_run_per_device_and_op(tmp_path):
    import json

    from benchmarks import report

    def rows(device, date, ms, side_by_side=True):
        ratio = {"ratio": 2.0, "ratio_p20": 1.9, "ratio_p80": 2.1} if side_by_side else {}
        return [{"op": "rms_norm", "impl": impl, "case": "N=1", "dtype": "bfloat16", "mode": "fwd", "median_ms": m,
                 "peak_mem_mb": 1.0, "device": "cuda", "device_name": device, "date": date, "commit": "abc",
                 "torch": "2.11", "triton": "3.6", "transformers": "5.17", "check": "ok",
                 **(ratio if impl != "eager" else {"ratio": None})}
                for impl, m in (("fastnlg", ms), ("eager", 2 * ms))]
    for name, device, date, ms in (("h100-old", "H100", "2026-11-01", 9.0), ("h100-new/ops-a", "H100", "2026-11-20", 1.0),
                                   ("h200", "H200", "2026-11-05", 0.5)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(rows(device, date, ms, name != "h200")))
    text = report.render(str(tmp_path))
    assert "## H100 (cuda)" in text and "## H200 (cuda)" in text
    assert "| N=1 | bfloat16 | fwd | 1.000 | 2.000 | 2.00x [1.90–2.10] |" in text and "9.000" not in text
    # a run from before side-by-side timing: its two times are shown, their quotient is not
    assert "| N=1 | bfloat16 | fwd | 0.500 | 1.000 | n/a (not side by side) |" in text


def test_cpu_peak_memory_counts_blocks_reused_from_the_heap():
    """A large block freed inside glibc's heap before the measurement (earlier tests, another arena) is
    already resident: reused, it would not raise the resident-set peak. The CPU peak releases free heap
    memory first, so the eager loss's (N, V) logits and their gradients still count (2048 x 16000 fp32 =
    125 MB each). Run in a fresh interpreter: the allocator settings it changes are process-wide."""
    import subprocess
    import sys

    script = """
import ctypes, sys, torch
import torch.nn.functional as F
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30); libc.mallopt(-1, 1 << 30)  # keep big blocks in the heap, never trimmed
a = torch.empty(400 * 2**20 // 4); a.fill_(1); pin = torch.empty(1000); del a
from benchmarks.harness import peak_memory_mb
h = torch.randn(2048, 64, requires_grad=True); w = torch.randn(16000, 64, requires_grad=True)
y = torch.randint(0, 16000, (2048,))
print(peak_memory_mb(lambda: F.cross_entropy(F.linear(h, w), y).backward(), "cpu"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) > 1.5 * 125, out.stdout
