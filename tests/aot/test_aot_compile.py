"""Every Triton kernel x every config its launcher can pick compiles for every target (sm_75 T4 / RTX 20 to
sm_120 RTX 50) and fits the target's shared memory; the tiled kernels' candidates on each target compile with
0 spill bytes (the others are excluded there by kernels/_excluded.py) and every launch group has a default
there. Runs `python -m fastnlg.aot` in a subprocess without TRITON_INTERPRET (the interpreter replaces
@triton.jit functions, which the compiler cannot lower), in the background while the other tests run
(background.py)."""
import inspect
from collections import Counter

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


def _may_fall_back(group, arch):
    """The (group, target)s allowed to have no clean candidate (their launcher runs something else): sm_75's
    small register file and shared memory; the fp32 builds, whose products run on FMA units in fp32
    (kernels/_dot.py: Triton's tf32 erred 100x PyTorch's fp32 on an H200) and take more registers, so that
    every tile of some fp32 groups spills (fp32 attention then runs on SDPA, in fp32); the dQ kernel with
    T5's bias sums (RP1) on sm_80 at half D256."""
    return (arch == 75 or "/fp32/" in group
            or (arch == 80 and group == "attn_bwd_dq_kernel/half/D256/RP1"))


def test_every_launch_group_has_a_candidate_on_every_target():
    """From the tables alone (no compile): no (group, target) is left without a candidate, and the exclusion
    table names only groups and configs that exist."""
    from fastnlg import aot
    from fastnlg.kernels._arch import ARCHS, candidates
    from fastnlg.kernels._excluded import EXCLUDED

    assert tuple(aot.ARCHS) == ARCHS
    groups = {}
    for spec in aot.all_specs():
        if "group" in spec:
            groups.setdefault(spec["group"], []).append(tuple(spec["config"]))
    assert len(groups) >= 40
    fallback = aot.fallbacks()
    for group, configs in groups.items():
        for arch in ARCHS:
            if not candidates(group, configs, arch):  # only where the launcher runs something else
                assert group.split("/")[0] in fallback, f"{group}: no candidate on sm_{arch} and no fallback"
                assert _may_fall_back(group, arch), (group, arch)
    for group, by_arch in EXCLUDED.items():
        assert group in groups, f"kernels/_excluded.py names an unknown group {group}"
        for arch, configs in by_arch.items():
            assert arch in ARCHS and set(configs) <= set(groups[group]), (group, arch)


def test_all_kernels_compile_for_all_targets():
    from fastnlg.kernels._arch import ARCHS

    from . import background

    code, rows, output = background.result(timeout=2400)  # (started at collection: tests/conftest.py)
    assert rows, f"no kernels compiled:\n{output}"
    assert {r["arch"] for r in rows} == set(ARCHS)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['config']}: {r['error']}" for r in bad[:20])
    assert code == 0, output
    defaults = [r for r in rows if r["default"]]
    assert all(r["spill_bytes"] == 0 and not r["excluded"] for r in defaults)
    per_group = Counter((r["group"], r["arch"]) for r in defaults)
    falling_back = {(r["group"], r["arch"]) for r in rows if r["fallback"]}
    groups = {r["group"] for r in rows if r["group"]}
    assert set(per_group) | falling_back == {(g, a) for g in groups for a in ARCHS}
    assert set(per_group.values()) == {1} and not set(per_group) & falling_back
    assert all(_may_fall_back(g, a) for g, a in falling_back), falling_back
    assert all(r["spill_bytes"] == 0 for r in rows if r["group"] and not r["excluded"])  # every candidate
    sm75 = [r for r in rows if r["arch"] == 75 and "bf16" in r["config"]]
    assert not sm75, "sm_75 has no bf16: its half-precision builds compile in fp16"


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
