"""fused_linear_logprobs vs eager vs TRL's chunked kernel, forward + backward, side by side (README.md here).
PYTHONPATH=. python benchmarks/results/cpu-2026-12-03-logprobs-distillation/logprobs_side_by_side.py N V C"""
import sys

import torch

from benchmarks.bench_fused_linear_logprobs import eager, make_inputs
from benchmarks.harness import peak_memory_mb
from benchmarks.peers import fused_linear_logprobs_peers
from benchmarks.side_by_side import compare
from fastnlg.ops import fused_linear_logprobs

torch.manual_seed(0)
N, V, C = (int(x) for x in sys.argv[1:4])
trl = fused_linear_logprobs_peers()["trl.chunked_logprob"]
for frozen in (True, False):
    x = make_inputs({"N": N, "V": V, "C": C, "frozen": frozen}, "cpu", torch.float32)
    leaves = [t for t in x.values() if t.requires_grad]

    def step(fn, x=x, leaves=leaves):
        def run():
            for t in leaves:
                t.grad = None
            fn(**x).sum().backward()
        return run

    fns = {"fastnlg": step(fused_linear_logprobs), "eager": step(eager), "trl": step(trl)}
    r = compare(fns, device="cpu", baseline="eager", rounds=5, warmup=1)
    mem = {k: peak_memory_mb(f, "cpu") for k, f in fns.items()}
    print("frozen" if frozen else "trainable", {k: (round(r.ms[k].median), round(mem[k])) for k in fns},
          "fastnlg", r.ratio("fastnlg"), "trl", r.ratio("trl"), flush=True)
