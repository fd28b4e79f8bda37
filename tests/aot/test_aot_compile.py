"""Every Triton kernel x every config its launcher can pick compiles for sm_80/86/89/90 and fits the
target's shared memory. Runs `python -m fastnlg.aot` in a subprocess without TRITON_INTERPRET (the
interpreter replaces @triton.jit functions, which the compiler cannot lower)."""
import inspect
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_kernel_has_aot_specs():
    import triton  # noqa: F401

    from fastnlg import aot

    covered = {spec["kernel"] for spec in aot.all_specs()}
    for mod in aot.kernel_modules():
        launched = {name for name, obj in vars(mod).items()
                    if name.endswith("_kernel") and not inspect.ismodule(obj)}
        named = {getattr(getattr(k, "fn", k), "__name__", None) for k in covered}
        missing = launched - named
        assert not missing, f"{mod.__name__}: kernels without AOT_SPECS: {sorted(missing)}"


def test_all_kernels_compile_for_all_targets(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastnlg.aot", "--json", str(out)], capture_output=True, text=True,
                          env=env, timeout=1500)
    rows = json.loads(out.read_text()) if out.exists() else []
    assert rows, f"no kernels compiled:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert {r["arch"] for r in rows} == {80, 86, 89, 90}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['config']}: {r['error']}" for r in bad[:20])
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_aot_signatures_come_from_the_declared_argument_types():
    """A kernel's AOT signature is read from its annotations (the types the JIT launches with too), not
    guessed from argument names; an undeclared argument is a data pointer, and an unknown type is refused."""
    import torch
    import triton
    import triton.language as tl

    from fastnlg.kernels._launch import declared_signature

    def toy(X, OUT: "*fp32", n: tl.int32, stride_b: tl.int64, scale: tl.float32, BLOCK: tl.constexpr):
        pass

    assert declared_signature(triton.jit(toy), torch.bfloat16) == {
        "X": "*bf16", "OUT": "*fp32", "n": "i32", "stride_b": "i64", "scale": "fp32", "BLOCK": "constexpr"}
    assert declared_signature(triton.jit(toy), torch.float32, X="u8")["X"] == "*u8"

    def bad(X, n: tl.int16):
        pass
    with pytest.raises(TypeError, match="argument n"):
        declared_signature(triton.jit(bad), torch.float32)
