"""The GPU run: first `--part smoke`, the evidence that matters most in one device command; then, for a longer
lease, parts that each fit one 10-minute command.

    python3 scripts/gpu_check.py --part smoke --budget 420 --export "$OUT"   # the first command on a lent GPU
    python3 scripts/gpu_check.py --part tests --export "$OUT"     # one part; its folder packed into $OUT
    python3 scripts/gpu_check.py --part all                        # every part (make gpu-all)
    python3 scripts/gpu_check.py --dry-run [--part smoke --budget 420]   # on CPU: everything but the GPU itself

smoke: the steps of SMOKE below, in order, each under its cap and all within --budget seconds (default 420:
a device command may run 600 s, and a lease of 15 minutes must leave room for one rerun). Each result is one
JSON line of smoke.jsonl the moment it exists, with the GPU, the versions, the commit and the date; the log is
smoke.log; the tuned tile configs tuned_configs.json. With --export DIR they are written there directly (a kill
at any moment keeps every finished row), and copied to benchmarks/results/<gpu>-<yyyymmdd>/smoke/ at the end.
Back on the development machine: copy the files into that folder, run `python -m benchmarks.report` and commit.

Parts, each writing benchmarks/results/<gpu>-<yyyymmdd>/<part>/ (and <part>/DONE when it finished):
    tests    the extension built with its CUDA kernels, then `pytest -m gpu` (log + junit XML)
    ops-a    op benchmarks, full sweep: norms, GLUs, GELU, RoPE, the losses
    ops-b    op benchmarks, full sweep: attention, decode, LoRA / QLoRA layer, NF4 (+ tuned_configs.json)
    e2e      the training-step benchmark (1.1B Llama: full, LoRA, QLoRA, LoRA + offload; 8B QLoRA)
    context  the longest sequence whose step fits 24 GB, per method, fastnlg vs plain Transformers + PEFT
A part that has its DONE file is skipped (resumable across device calls; --force runs it again). Every part
first makes sure of the set-up: the machine's own packages, missing ones from wheels carried in .whl/
(scripts/fetch_gpu_wheels.sh), installed without an index; nothing that is there is replaced.
--export DIR packs each part's folder into DIR/<gpu>-<date>-<part>.tar.gz: one file per part, well under
the device tool's limits on what comes back (8 files of 16 MiB). Back on the development machine: unpack the
archives into benchmarks/results/, run `python -m benchmarks.report` (benchmarks/README.md) and commit both.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ["pybind11", "pytest", "pytest_benchmark", "matplotlib", "transformers", "peft", "safetensors",
          "sacrebleu", "rouge_score", "tokenizers", "yaml"]
OPTIONAL = ["bitsandbytes", "liger_kernel", "cut_cross_entropy"]  # peers: benchmarked when present
PARTS = {
    "tests": [[sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o",
               "addopts=-ra", "--junitxml", "{dir}/gpu_tests.xml"]],
    "ops-a": [[sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--full", "--out", "{dir}", "--ops",
               "rms_norm", "layer_norm", "add_layer_norm", "swiglu", "geglu", "gelu", "rope", "cross_entropy",
               "fused_linear_cross_entropy", "fused_linear_logprobs", "fused_linear_distillation_loss"]],
    "ops-b": [[sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--full", "--out", "{dir}", "--ops",
               "attention", "attention_decode", "relative_position_attention", "lora_linear", "nf4"]],
    "e2e": [[sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--full", "--rep", "5", "--out", "{dir}",
             "--ops", "train_step"]],
    "context": [[sys.executable, "-m", "benchmarks.bench_train_step", "--max-context", "--budget-gb", "24",
                 "--out", "{dir}"]],
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool sends back
RETURN_LIMITS = {"files": 8, "bytes_each": 16 * 2**20}  # the device tool's limits on what comes back from $OUT
# --part smoke: (step, cap in seconds, what runs it), in this order; each step's rows stream to smoke.jsonl.
# A None target runs in this process (run_smoke's functions); the others in a child process each
# (benchmarks/smoke.py).
SMOKE = (
# Caps from the first run (H200, 2026-12-04): setup took 15 s with the wheels carried, the CUDA extension's
# build 25 s (it timed out at 19 s under a cap of 30), and the timings step left its last two rows unrun.
    ("setup", 40, None),                                      # carried wheels; the package and its C++ extension
    ("correctness", 130, "benchmarks.smoke_checks:correctness"),   # every Triton kernel vs the fp64 spec
    ("llama", 35, "benchmarks.smoke_checks:llama"),            # patched small Llama vs unpatched; generate; syncs
    ("timings", 145, "benchmarks.smoke_timings:timings"),      # headline timings, side by side
    ("tuned_configs", 5, None),                               # the tile configs the timings tuned (a row)
    ("cuda_ext", 60, "benchmarks.smoke_checks:cuda_ext"),      # the CUDA extension, if the budget allows
)
SMOKE_BUDGET = 420
INLINE_STEPS = ("setup", "tuned_configs")  # run_smoke's own functions
SMOKE_NEEDED = ["pybind11", "setuptools", "transformers", "peft", "safetensors"]  # what the smoke run imports


def missing_modules(names) -> list:
    return [m for m in names if importlib.util.find_spec(m) is None]


def wheel_problems(folder: str, python: str = "3.12") -> list:
    """Carried wheels that cannot install on the GPU image (CPython `python`, Linux x86-64), and duplicates."""
    tag = "cp" + python.replace(".", "")
    problems, seen = [], {}
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        name = os.path.basename(path)
        parts = name[:-4].split("-")
        if len(parts) < 5:
            problems.append(f"{name}: not a wheel file name")
            continue
        dist, pytag, abi, plat = parts[0].lower(), parts[-3], parts[-2], parts[-1]
        if dist in seen:
            problems.append(f"{name}: a second version of {dist} (also {seen[dist]}): pip stops on two")
        seen[dist] = name
        if not any(t in ("py3", tag) or t.startswith("py3") for t in pytag.split(".")) and abi != "abi3":
            problems.append(f"{name}: built for {pytag}, the image runs CPython {python}")
        if plat != "any" and not all(("x86_64" in p and ("manylinux" in p or "linux" in p)) for p in plat.split(".")):
            problems.append(f"{name}: platform {plat} is not Linux x86-64")
    return problems


def setup(log, needed=None, build_cuda: bool | None = None) -> dict:
    """Carried wheels for what is missing, then the package in place (its CUDA kernels when nvcc is here, or
    as build_cuda says). -> what it found and did."""
    needed = NEEDED if needed is None else needed
    missing = missing_modules(needed + OPTIONAL)
    wheels = glob.glob(os.path.join(ROOT, ".whl", "*.whl"))
    if missing and wheels:
        site = "/tmp/fastnlg-site"
        log(f"installing carried wheels (missing: {' '.join(missing)})")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", site, *wheels], check=True)
        sys.path.insert(0, site)
        os.environ["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")
        importlib.invalidate_caches()
    still = missing_modules(needed)
    if still:
        raise SystemExit(f"gpu_check: missing on this machine: {' '.join(still)}; carry their wheels in .whl/ "
                         "(scripts/fetch_gpu_wheels.sh)")
    absent = missing_modules(OPTIONAL)
    if absent:
        log(f"peers not installed (their benchmark rows will say so): {' '.join(absent)}")
    build_cuda = _which("nvcc") if build_cuda is None else build_cuda
    stamp = os.path.join(ROOT, "build", f".gpu-check-built{'-cuda' if build_cuda else ''}")
    if not os.path.exists(stamp):
        env = dict(os.environ, FASTNLG_BUILD_CUDA="1" if build_cuda else "0")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e",
                            ROOT], env=env, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"pip install -e . failed: {(r.stdout + r.stderr)[-1500:]}")
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        open(stamp, "w").close()
    return {"installed_from_wheels": [m for m in missing if m not in missing_modules([m])],
            "peers_missing": absent, "python": sys.version.split()[0]}


def _which(cmd):
    return any(os.access(os.path.join(p, cmd), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))


def results_dir(gpu: str, date: str) -> str:
    return os.path.join(ROOT, "benchmarks", "results", f"{gpu}-{date}")


def write_env(folder: str) -> None:
    import torch

    lines = [datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             f"gpu {torch.cuda.get_device_name()}", f"python {sys.version.split()[0]}", f"torch {torch.__version__}",
             f"cuda {torch.version.cuda}"]
    for mod in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            lines.append(f"{mod} not installed")
    lines.append("commit " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=ROOT).stdout.strip())
    with open(os.path.join(folder, "env.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_part(part: str, top: str, force: bool, log) -> int:
    folder = os.path.join(top, part)
    if os.path.exists(os.path.join(folder, "DONE")) and not force:
        log(f"{part}: done before ({folder}/DONE); skipped (--force runs it again)")
        return 0
    os.makedirs(folder, exist_ok=True)
    write_env(folder)
    rc = 0
    with open(os.path.join(folder, f"{part}.log"), "w") as logf:
        for cmd in PARTS[part]:
            cmd = [c.format(dir=folder) for c in cmd]
            log(f"{part}: {shlex.join(cmd)}")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            for line in proc.stdout:
                sys.stdout.write(line)
                logf.write(line)
            rc = rc or proc.wait()
    if rc == 0:
        open(os.path.join(folder, "DONE"), "w").close()
    log(f"{part}: exit {rc} -> {folder}")
    return rc


def export(top: str, part: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    name = f"{os.path.basename(top)}-{part}.tar.gz"
    with tarfile.open(os.path.join(dest, name), "w:gz") as tar:
        tar.add(os.path.join(top, part), arcname=os.path.join(os.path.basename(top), part))
    return os.path.join(dest, name)


def smoke_plan_problems(budget: float) -> list:
    """The smoke run's plan, checked without a GPU: every step's target imports, the caps fit the budget, the
    files that come back fit the device tool's limits."""
    import importlib

    from benchmarks import smoke

    problems = []
    total = sum(cap for _, cap, _ in SMOKE)
    if total > budget:
        problems.append(f"smoke: the step caps add up to {total} s, over the budget of {budget:g} s")
    for name, _cap, target in SMOKE:
        if target is None:
            if name not in INLINE_STEPS:
                problems.append(f"smoke: step {name} has no target and runs nowhere")
            continue
        module, _, fn = target.partition(":")
        try:
            if not callable(getattr(importlib.import_module(module), fn, None)):
                problems.append(f"smoke: step {name}: {target} is not a function")
        except Exception as exc:  # a step whose module does not import would fail on the GPU
            problems.append(f"smoke: step {name}: {module} does not import ({type(exc).__name__}: {exc})")
    names = [n for n, _, _ in SMOKE]
    if len(set(names)) != len(names):
        problems.append("smoke: two steps share a name")
    files = smoke.OUTPUT_FILES
    if len(files) > RETURN_LIMITS["files"]:
        problems.append(f"smoke: {len(files)} output files, the device returns {RETURN_LIMITS['files']}")
    problems += [f"smoke: output file {f} would not come back from the device" for f in files if not SAFE_NAME.match(f)]
    return problems


def run_smoke(budget: float, export: str | None, log, device: str = "cuda", tiny: bool = False) -> int:
    """--part smoke (see the module docstring); -> the number of steps that did not finish."""
    from benchmarks import smoke

    start = time.time()
    if device == "cuda":
        import torch

        gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name())
    else:
        gpu = "cpu"
    top = results_dir(gpu, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"))
    out = export or os.path.join(top, "smoke")

    def do_setup(limit):
        if device != "cuda":
            return {"status": "skipped", "reason": "the CPU rehearsal of the smoke run uses the installed package"}
        t0 = time.time()
        found = setup(log, needed=SMOKE_NEEDED, build_cuda=False)  # the CUDA extension is the last step's
        return {**found, "setup_seconds": round(time.time() - t0, 1)}

    def tuned(limit):
        path = os.path.join(out, smoke.TUNED)
        if not os.path.exists(path):
            return {"status": "skipped", "reason": "no kernel was tuned (the timings step did not run)"}
        with open(path) as f:
            return {"keys": len(json.load(f)), "file": smoke.TUNED}

    # the CPU rehearsal runs the kernels under the Triton interpreter where they are checked, and the CPU
    # backends elsewhere (the interpreter is no GPU arithmetic in bf16, and slow)
    step_env = {} if device == "cuda" else {n: {"TRITON_INTERPRET": "1" if n == "correctness" else "0"}
                                            for n, _, _ in SMOKE}
    left = budget - (time.time() - start)
    unfinished = smoke.run_steps(SMOKE, left, out, log, device=device, tiny=tiny, step_env=step_env,
                                 inline={"setup": do_setup, "tuned_configs": tuned}, env=smoke.environment(device))
    if export and device == "cuda":
        os.makedirs(os.path.join(top, "smoke"), exist_ok=True)
        for name in smoke.OUTPUT_FILES:
            if os.path.exists(os.path.join(export, name)):
                shutil.copy(os.path.join(export, name), os.path.join(top, "smoke", name))
    log(f"smoke: {len(SMOKE) - unfinished} of {len(SMOKE)} steps finished in {time.time() - start:.0f} s -> {out}")
    return unfinished


def dry_run(log, part: str = "all", budget: float = SMOKE_BUDGET) -> int:
    """Everything but the GPU: the parts' commands parse, every gpu test is collected, the wheels fit the
    image, the output names fit what the device tool sends back."""
    problems = []
    for part, cmds in PARTS.items():
        for cmd in cmds:
            cmd_help = [c.format(dir="/tmp/gpu-check-dry-run") for c in cmd] + ["--help"]
            r = subprocess.run(cmd_help, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"{part}: {shlex.join(cmd_help)} exits {r.returncode}: {r.stderr[-300:]}")
            if cmd[1:3] == ["-m", "benchmarks.run"]:
                from benchmarks.run import OPS  # the benchmark names each part asks for exist

                ops = cmd[cmd.index("--ops") + 1:]
                problems += [f"{part}: no benchmark named {op}" for op in ops if op not in OPS]
        name = f"GPU_NAME-20260101-{part}.tar.gz"
        if not SAFE_NAME.match(name):
            problems.append(f"{part}: archive name {name} would not come back from the device")
    covered = [op for cmds in PARTS.values() for cmd in cmds if "--ops" in cmd for op in cmd[cmd.index("--ops") + 1:]]
    from benchmarks.run import OPS

    problems += [f"benchmark {op} is in no part" for op in OPS if op not in covered]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True)
    collected = [line for line in r.stdout.splitlines() if "::" in line]
    if r.returncode != 0 or not collected:  # 2: collection errors, 5: nothing collected
        problems.append(f"pytest -m gpu does not collect cleanly (exit {r.returncode}): {r.stdout[-500:]}")
    problems += wheel_problems(os.path.join(ROOT, ".whl"))
    if part in ("smoke", "all"):
        problems += smoke_plan_problems(budget)
    for p in problems:
        log(f"dry-run problem: {p}")
    log(f"dry-run: {len(collected)} gpu tests collected, parts {', '.join(PARTS)}, "
        f"{len(glob.glob(os.path.join(ROOT, '.whl', '*.whl')))} carried wheels; "
        + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["smoke", *PARTS, "all"], default="all",
                   help="smoke: the one-command run for a short lease; all: every other part")
    p.add_argument("--budget", type=float, default=SMOKE_BUDGET, help="--part smoke: seconds for all its steps")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--rehearse", action="store_true",
                   help="--part smoke on CPU at tiny sizes, every step's code run once (the test tier does this)")
    p.add_argument("--force", action="store_true", help="run parts that are marked DONE again")
    p.add_argument("--export", metavar="DIR", help="pack each part's folder into DIR/<gpu>-<date>-<part>.tar.gz")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)

    def log(msg):
        print(f"gpu_check: {msg}", flush=True)

    if args.dry_run:
        return dry_run(log, args.part, args.budget)
    if args.rehearse:
        if args.part != "smoke" or not args.export:
            p.error("--rehearse runs --part smoke into --export DIR")
        return 1 if run_smoke(args.budget, args.export, log, device="cpu", tiny=True) else 0
    import torch

    if not torch.cuda.is_available():
        log("no CUDA device (use --dry-run on a CPU machine)")
        return 1
    if args.part == "smoke":
        return 1 if run_smoke(args.budget, args.export, log) else 0
    setup(log)
    gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name())
    top = results_dir(gpu, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"))
    rc = 0
    for part in (PARTS if args.part == "all" else [args.part]):
        rc = run_part(part, top, args.force, log) or rc
        if args.export:
            log(f"{part}: packed into {export(top, part, args.export)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
