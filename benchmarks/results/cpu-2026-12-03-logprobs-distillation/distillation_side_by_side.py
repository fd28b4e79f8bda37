"""fused_linear_distillation_loss (forward KL) vs eager, forward + backward, side by side (README.md here).
PYTHONPATH=. python benchmarks/results/cpu-2026-12-03-logprobs-distillation/distillation_side_by_side.py"""
import torch

from benchmarks.bench_fused_linear_distillation_loss import eager, fastnlg, make_inputs
from benchmarks.harness import peak_memory_mb
from benchmarks.side_by_side import compare

torch.manual_seed(0)
x = make_inputs({"N": 4096, "V": 32000, "C": 1024, "loss": "forward_kl"}, "cpu", torch.float32)
leaves = [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def step(fn):
    def run():
        for t in leaves:
            t.grad = None
        fn(**x).backward()
    return run


fns = {"fastnlg": step(fastnlg), "eager": step(eager)}
r = compare(fns, device="cpu", baseline="eager", rounds=5, warmup=1)
mem = {k: peak_memory_mb(f, "cpu") for k, f in fns.items()}
print("forward_kl", {k: (round(r.ms[k].median), round(mem[k])) for k in fns}, "fastnlg", r.ratio("fastnlg"))
