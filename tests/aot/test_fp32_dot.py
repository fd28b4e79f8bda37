"""fp32 kernels multiply in fp32: their tl.dot goes through kernels/_dot.dot ("ieee"), not Triton's default
tf32, which erred 100 times more than PyTorch's fp32 attention on the first GPU run (an H200; the interpreter
cannot show it: it multiplies in fp32 whatever the precision asked). Read from the PTX that the compiler
writes for sm_80 (no GPU needed), in a subprocess without TRITON_INTERPRET; the bf16 builds of the same
kernels keep the matrix units (mma), so the check can tell the two apart."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json
from fastnlg import aot
from fastnlg.kernels import attention, attention_decode, nf4_matmul
out = {}
for mod in (attention, attention_decode, nf4_matmul):
    seen = set()
    for spec in mod.AOT_SPECS:
        name = spec["kernel"].fn.__name__
        half = "fp32" not in spec.get("group", "")
        if (name, half) in seen:
            continue
        seen.add((name, half))
        ptx = aot.compile_spec(spec, 80).asm["ptx"]
        out[f"{name}/{'half' if half else 'fp32'}"] = {"tf32": ".tf32" in ptx, "mma": "mma.sync" in ptx}
print(json.dumps(out))
"""


def test_fp32_kernels_do_not_round_to_tf32():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    fp32 = {k: v for k, v in found.items() if k.endswith("/fp32")}
    half = {k: v for k, v in found.items() if k.endswith("/half")}
    assert fp32 and half, found
    assert not [k for k, v in fp32.items() if v["tf32"]], f"fp32 builds with tf32 products: {found}"
    assert all(v["mma"] for v in half.values()), f"half-precision builds without the matrix units: {found}"
