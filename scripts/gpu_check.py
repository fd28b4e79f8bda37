"""The GPU run in parts that each fit one 10-minute device command, or all of them in one go.

    python3 scripts/gpu_check.py --part tests --export "$OUT"     # one part; its folder packed into $OUT
    python3 scripts/gpu_check.py --part all                        # every part (make gpu)
    python3 scripts/gpu_check.py --dry-run                         # on CPU: everything but the GPU itself

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
import os
import re
import shlex
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ["pybind11", "pytest", "pytest_benchmark", "matplotlib", "transformers", "peft", "safetensors",
          "sacrebleu", "rouge_score", "tokenizers", "yaml"]
OPTIONAL = ["bitsandbytes", "liger_kernel", "cut_cross_entropy"]  # peers: benchmarked when present
PARTS = {
    "tests": [[sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o",
               "addopts=-ra", "--junitxml", "{dir}/gpu_tests.xml"]],
    "ops-a": [[sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--full", "--out", "{dir}", "--ops",
               "rms_norm", "layer_norm", "swiglu", "geglu", "gelu", "rope", "cross_entropy",
               "fused_linear_cross_entropy"]],
    "ops-b": [[sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--full", "--out", "{dir}", "--ops",
               "attention", "attention_decode", "lora_linear", "nf4"]],
    "e2e": [[sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--full", "--rep", "5", "--out", "{dir}",
             "--ops", "train_step"]],
    "context": [[sys.executable, "-m", "benchmarks.bench_train_step", "--max-context", "--budget-gb", "24",
                 "--out", "{dir}"]],
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool sends back


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


def setup(log) -> None:
    """Carried wheels for what is missing, then the package in place (its CUDA kernels when nvcc is here)."""
    missing = missing_modules(NEEDED + OPTIONAL)
    wheels = glob.glob(os.path.join(ROOT, ".whl", "*.whl"))
    if missing and wheels:
        site = "/tmp/fastnlg-site"
        log(f"installing carried wheels (missing: {' '.join(missing)})")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", site, *wheels], check=True)
        sys.path.insert(0, site)
        os.environ["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")
        importlib.invalidate_caches()
    still = missing_modules(NEEDED)
    if still:
        raise SystemExit(f"gpu_check: missing on this machine: {' '.join(still)}; carry their wheels in .whl/ "
                         "(scripts/fetch_gpu_wheels.sh)")
    absent = missing_modules(OPTIONAL)
    if absent:
        log(f"peers not installed (their benchmark rows will say so): {' '.join(absent)}")
    stamp = os.path.join(ROOT, "build", ".gpu-check-built")
    if not os.path.exists(stamp):
        env = dict(os.environ, FASTNLG_BUILD_CUDA="1" if _which("nvcc") else "0")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", ROOT],
                       check=True, env=env, cwd=ROOT)
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        open(stamp, "w").close()


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


def dry_run(log) -> int:
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
    for p in problems:
        log(f"dry-run problem: {p}")
    log(f"dry-run: {len(collected)} gpu tests collected, parts {', '.join(PARTS)}, "
        f"{len(glob.glob(os.path.join(ROOT, '.whl', '*.whl')))} carried wheels; "
        + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--force", action="store_true", help="run parts that are marked DONE again")
    p.add_argument("--export", metavar="DIR", help="pack each part's folder into DIR/<gpu>-<date>-<part>.tar.gz")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)

    def log(msg):
        print(f"gpu_check: {msg}", flush=True)

    if args.dry_run:
        return dry_run(log)
    import torch

    if not torch.cuda.is_available():
        log("no CUDA device (use --dry-run on a CPU machine)")
        return 1
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
