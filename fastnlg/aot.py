"""Ahead-of-time compile check: every Triton kernel x every config its launcher can pick, compiled for
the GPUs we target, without a GPU.

For each spec in ``fastnlg.kernels.<op>.AOT_SPECS`` and each target it runs
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, reads the shared memory the kernel
needs from the compiled metadata and the register / spill counts from ``ptxas -v`` on the PTX, and
fails a row whose shared memory exceeds the target's per-block limit (DESIGN.md §5).

    python -m fastnlg.aot [--arch 80 86 89 90] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# Max dynamic shared memory per block (opt-in), bytes: A100, RTX 3090, RTX 4090, H100.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = tuple(SMEM_LIMIT)


@dataclass
class AotRow:
    kernel: str
    arch: int
    config: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    ok: bool
    error: str = ""


def kernel_modules():
    import fastnlg.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"fastnlg.kernels.{info.name}")


def all_specs():
    return [spec for mod in kernel_modules() for spec in getattr(mod, "AOT_SPECS", ())]


def _ptxas_usage(ptx: str, arch: int, log: str = "") -> tuple[int, int]:
    """(registers, spill bytes) from the `ptxas -v` log Triton printed while compiling (TRITON_DUMP_PTXAS_LOG),
    or, when the kernel came from Triton's cache (no ptxas run), from running ptxas -v on the PTX here."""
    text = log
    if "Used " not in text:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        text = out.stdout + out.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", text)), default=0)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
    return regs, spills


def compile_one(spec: dict, arch: int) -> AotRow:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec["kernel"]
    name = fn.fn.__name__
    sig = spec["signature"]
    config = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    config += f",num_warps={spec['num_warps']},dtypes=" + "/".join(sorted({v for v in sig.values() if v and v.startswith('*')}))
    log = io.StringIO()
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=spec["constexprs"])
        dump = triton.knobs.nvidia.dump_ptxas_log
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log: no second ptxas run
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": spec["num_warps"],
                                                   "num_stages": spec.get("num_stages", 3)})
        finally:
            triton.knobs.nvidia.dump_ptxas_log = dump  # the caller's JIT compiles stay quiet
    except Exception as exc:  # a config that does not compile is a failing row, reported with its error
        return AotRow(name, arch, config, 0, 0, 0, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    shared = int(compiled.metadata.shared)
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch, log.getvalue())
    ok = shared <= SMEM_LIMIT[arch]
    err = "" if ok else f"shared memory {shared} B exceeds sm_{arch} limit {SMEM_LIMIT[arch]} B"
    return AotRow(name, arch, config, shared, regs, spills, ok, err)


def _compile_indexed(args):
    index, arch = args
    return compile_one(all_specs()[index], arch)


def check(archs=ARCHS, workers: int | None = None) -> list[AotRow]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # @triton.jit then returns interpreter objects, which triton.compile cannot lower.
        raise RuntimeError("the AOT check compiles real kernels: run it without TRITON_INTERPRET=1")
    jobs = [(i, a) for i in range(len(all_specs())) for a in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_indexed(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_indexed, jobs, chunksize=4))


def format_rows(rows: list[AotRow]) -> str:
    lines = [f"{'kernel':34} {'arch':>5} {'smem KB':>8} {'regs':>5} {'spill B':>8}  config"]
    for r in rows:
        flag = "" if r.ok else f"   FAIL: {r.error}"
        lines.append(f"{r.kernel:34} sm_{r.arch:<2} {r.shared_bytes / 1024:8.1f} {r.registers:5d} {r.spill_bytes:8d}  {r.config}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = check(tuple(args.arch))
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    spilled = [r for r in rows if r.spill_bytes]
    print(f"\n{len(rows)} compiled, {len(bad)} failed, {len(spilled)} with register spills")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
