"""pytest-benchmark over the op benchmarks (the quick cases, fastnlg's implementations and eager), so numbers can be kept and
compared between commits:

    pytest benchmarks/ --benchmark-only --benchmark-autosave          # saves .benchmarks/<machine>/<n>.json
    pytest benchmarks/ --benchmark-only --benchmark-compare           # against the last saved run

Each case's output is checked against its fp64 spec first (harness.check_output), as in `fastnlg bench`.
"""
import pytest
import torch

from .harness import _step, check_output
from .run import E2E, OPS, load_bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _params():
    for op in OPS:
        if op in E2E:
            continue
        bench = load_bench(op)
        for case in bench.cases(True, DEVICE):
            for impl in bench.impls:
                if impl.startswith("fastnlg") or impl == "eager":
                    for mode in bench.modes:
                        yield pytest.param(op, case, impl, mode, id=f"{op}-{case.label}-{impl}-{mode}")


@pytest.mark.parametrize("op, case, impl, mode", list(_params()))
def test_op(benchmark, op, case, impl, mode):
    bench = load_bench(op)
    inputs = bench.make_inputs(case.params, DEVICE, DTYPE)
    fn = bench.impls[impl]
    verdict = check_output(bench, impl, fn, inputs, DTYPE)
    assert not verdict.startswith("FAIL"), verdict
    run = _step(fn, inputs, mode)
    if DEVICE == "cuda":
        def timed():
            run()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(run)
    benchmark.extra_info.update(op=op, case=case.label, impl=impl, mode=mode, dtype=str(DTYPE))
