"""Ahead-of-time compile check: every Triton kernel x every config its launcher can pick, compiled for
the GPUs we target (T4 / RTX 20 to RTX 50), without a GPU.

For each spec in ``fastnlg.kernels.<op>.AOT_SPECS`` and each target it runs
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, reads the shared memory the kernel
needs from the compiled metadata and the register / spill counts from ``ptxas -v`` on the PTX, and
fails a row whose shared memory exceeds the target's per-block limit (DESIGN.md §5). On sm_75 (no bf16) the
half-precision builds compile in fp16.

Tiled kernels name a launch group and a config per spec (kernels/_arch.py): on each target, the group's
configs listed in kernels/_excluded.py are not candidates and are not compiled; every other one must compile
with 0 spill bytes and fit, each group needs at least one such candidate per target, and its first one is
the target's untuned default (`"default": true` in the JSON); a group may go without a candidate on a
target only where its kernel file names what runs instead (AOT_FALLBACK: the launcher checks it). `--all-configs` compiles the excluded ones too
(a listed config that compiles cleanly fails: the table is stale); `--write-exclusions` adds the candidates
that spill or overflow to kernels/_excluded.py (with `--all-configs`: rewrites it from every config). Row kernels (one config per row width) are
checked for shared memory; their spills are reported.

    python -m fastnlg.aot [--arch 75 80 86 89 90 120] [--json out.json] [--workers N]
                          [--all-configs | --write-exclusions]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import pprint
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# Max dynamic shared memory per block (opt-in), bytes: T4 / RTX 20, A100, RTX 30, RTX 40, H100, RTX 50 (CUDA
# C++ Programming Guide, technical specifications per compute capability).
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
ARCHS = tuple(SMEM_LIMIT)


@dataclass
class AotRow:
    kernel: str
    arch: int
    config: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    ok: bool  # the verdict (judge)
    error: str = ""  # why not ok
    group: str = ""  # the launch group of a tiled kernel's spec ("" for row kernels)
    cfg: tuple = ()  # its config, as the launcher's table writes it
    default: bool = False  # the first candidate of its group on this target: what runs untuned
    excluded: bool = False  # listed in kernels/_excluded.py for this target (compiled with --all-configs only)
    compile_error: str = ""  # what the compiler said, when it failed
    fallback: str = ""  # a group without a candidate here: what its launcher runs instead (AOT_FALLBACK)

    @property
    def fits(self) -> bool:
        return not self.compile_error and self.shared_bytes <= SMEM_LIMIT[self.arch]

    @property
    def clean(self) -> bool:
        return self.fits and self.spill_bytes == 0


def kernel_modules():
    import fastnlg.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"fastnlg.kernels.{info.name}")


def all_specs():
    return [spec for mod in kernel_modules() for spec in getattr(mod, "AOT_SPECS", ())]


def fallbacks() -> dict:
    """{kernel name: what runs instead where its launch group has no candidate} (each file's AOT_FALLBACK)."""
    return {k: v for mod in kernel_modules() for k, v in getattr(mod, "AOT_FALLBACK", {}).items()}


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


def _signature(spec: dict, arch: int) -> dict:
    from fastnlg.kernels._arch import aot_dtype_name

    return {k: ("*" + aot_dtype_name(v[1:], arch) if isinstance(v, str) and v.startswith("*") else v)
            for k, v in spec["signature"].items()}


def compile_spec(spec: dict, arch: int, log=None):
    """triton.compile of one spec for sm_`arch` (no GPU needed); Triton's ptxas -v log goes to `log`."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec["kernel"], signature=_signature(spec, arch), constexprs=spec["constexprs"])
    dump = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log: no second ptxas run
    try:
        with contextlib.redirect_stdout(log or io.StringIO()):
            return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)})
    finally:
        triton.knobs.nvidia.dump_ptxas_log = dump  # the caller's JIT compiles stay quiet


def compile_one(spec: dict, arch: int) -> AotRow:
    name = spec["kernel"].fn.__name__
    sig = _signature(spec, arch)
    config = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    config += f",num_warps={spec['num_warps']},dtypes=" + "/".join(sorted({v for v in sig.values() if v and v.startswith('*')}))
    log = io.StringIO()
    try:
        compiled = compile_spec(spec, arch, log)
    except Exception as exc:  # a config that does not compile is a failing row, reported with its error
        return AotRow(name, arch, config, 0, 0, 0, False, group=spec.get("group", ""), cfg=tuple(spec.get("config", ())),
                      compile_error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    shared = int(compiled.metadata.shared)
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch, log.getvalue())
    return AotRow(name, arch, config, shared, regs, spills, True, group=spec.get("group", ""),
                  cfg=tuple(spec.get("config", ())))


def _compile_indexed(args):
    index, arch = args
    return compile_one(all_specs()[index], arch)


def _excluded(spec: dict, arch: int) -> bool:
    from fastnlg.kernels._excluded import EXCLUDED

    return "group" in spec and tuple(spec["config"]) in EXCLUDED.get(spec["group"], {}).get(arch, ())


def check(archs=ARCHS, workers: int | None = None, all_configs: bool = False) -> list[AotRow]:
    """Compiles every spec for every target in `archs` (the excluded configs only with all_configs) and
    judges the rows (`judge`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # @triton.jit then returns interpreter objects, which triton.compile cannot lower.
        raise RuntimeError("the AOT check compiles real kernels: run it without TRITON_INTERPRET=1")
    specs = all_specs()
    jobs = [(i, a) for a in archs for i, spec in enumerate(specs) if all_configs or not _excluded(spec, a)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        rows = [_compile_indexed(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_compile_indexed, jobs, chunksize=4))
    return judge(rows, archs)


def judge(rows: list[AotRow], archs) -> list[AotRow]:
    """The verdicts, from the compiler's facts: a row kernel fails when it does not compile or fit; a tiled
    kernel's candidate also when it spills, an excluded config when it compiles cleanly (a stale table); each
    group's first candidate per target is its default, and a group without one there gets a failing row."""
    from fastnlg.kernels._excluded import EXCLUDED

    rows = [r for r in rows if r.config != "(none)"]
    for r in rows:
        r.ok, r.default = r.fits, False
        r.error = r.compile_error or ("" if r.fits else
                                      f"shared memory {r.shared_bytes} B exceeds sm_{r.arch} limit {SMEM_LIMIT[r.arch]} B")
        if not r.group:
            continue
        r.excluded = r.cfg in EXCLUDED.get(r.group, {}).get(r.arch, ())
        if r.excluded:
            r.ok, r.error = (False, f"listed as excluded on sm_{r.arch} but compiles with 0 spills and fits: the "
                                    "table is stale (python -m fastnlg.aot --write-exclusions --all-configs)") if r.clean else (True, "")
        elif r.fits and r.spill_bytes:
            r.ok, r.error = False, (f"a candidate on sm_{r.arch} that spills {r.spill_bytes} B "
                                    "(python -m fastnlg.aot --write-exclusions excludes it there)")
    fallback = fallbacks()
    for group in sorted({r.group for r in rows if r.group}):
        kernel = group.split("/")[0]
        for arch in archs:
            first = next((r for r in rows if r.group == group and r.arch == arch and not r.excluded and r.ok), None)
            if first is not None:
                first.default = True
            elif kernel in fallback:  # the launcher checks has_candidate and runs its fallback there
                rows.append(AotRow(kernel, arch, "(none)", 0, 0, 0, True, group=group,
                                   fallback=f"no candidate on sm_{arch}: {fallback[kernel]}"))
            else:
                rows.append(AotRow(kernel, arch, "(none)", 0, 0, 0, False,
                                   f"{group}: no config is a candidate on sm_{arch} (every one spills or overflows "
                                   "shared memory there): add a smaller one to the launcher's table", group))
    return rows


def exclusions(rows: list[AotRow]) -> dict:
    """{group: {arch: [configs that spill or do not fit there]}} from rows compiled with every config."""
    out = {}
    for r in rows:
        if r.group and r.cfg and not r.clean:
            out.setdefault(r.group, {}).setdefault(r.arch, set()).add(tuple(r.cfg))
    return {g: {a: sorted(c) for a, c in sorted(by.items())} for g, by in sorted(out.items())}


def write_exclusions(table: dict) -> str:
    path = os.path.join(os.path.dirname(importlib.import_module("fastnlg.kernels").__file__), "_excluded.py")
    with open(path, "w") as f:
        f.write('"""Generated by `python -m fastnlg.aot --write-exclusions` (do not edit by hand): per launch group, '
                'per\narchitecture, the candidate configs that spill registers or exceed shared memory there '
                '(kernels/_arch.py)."""\n')
        f.write("EXCLUDED = " + pprint.pformat(table, width=116, compact=True) + "\n")
    return path


def format_rows(rows: list[AotRow]) -> str:
    lines = [f"{'kernel':34} {'arch':>5} {'smem KB':>8} {'regs':>5} {'spill B':>8}  config"]
    for r in rows:
        flag = ("   FAIL: " + r.error) if not r.ok else "   (default)" if r.default else "   (excluded here)" if r.excluded \
            else f"   {r.group}: {r.fallback}" if r.fallback else ""
        lines.append(f"{r.kernel:34} sm_{r.arch:<3} {r.shared_bytes / 1024:7.1f} {r.registers:5d} {r.spill_bytes:8d}  "
                     f"{r.config}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--all-configs", action="store_true", help="compile the excluded configs too")
    p.add_argument("--write-exclusions", action="store_true",
                   help="compile every config for every target and rewrite kernels/_excluded.py")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    args = p.parse_args(argv)
    if args.write_exclusions and sorted(args.arch) != sorted(ARCHS):
        p.error("--write-exclusions compiles for every target: leave --arch out")
    rows = check(tuple(args.arch), workers=args.workers, all_configs=args.all_configs)
    if args.write_exclusions:
        from fastnlg.kernels._excluded import EXCLUDED

        table = exclusions(rows)
        if not args.all_configs:  # the candidates were compiled: keep what was excluded, add what spills now
            for group, by_arch in EXCLUDED.items():
                for arch, configs in by_arch.items():
                    merged = set(table.setdefault(group, {}).get(arch, [])) | {tuple(c) for c in configs}
                    table[group][arch] = sorted(merged)
            table = {g: dict(sorted(by.items())) for g, by in sorted(table.items())}
        print(f"wrote {write_exclusions(table)}")
        importlib.reload(importlib.import_module("fastnlg.kernels._excluded"))
        rows = judge(rows, ARCHS)
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    spilled = [r for r in rows if r.spill_bytes and not r.excluded]
    print(f"\n{len(rows)} compiled, {len(bad)} failed, {len(spilled)} with register spills "
          f"({sum(r.default for r in rows)} group defaults, {sum(bool(r.fallback) for r in rows)} groups falling back)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
