"""The GPU run is ready before a GPU comes: scripts/gpu_check.py --dry-run passes on CPU (commands, gpu tests
collected, every benchmark in a part, archive names the device tool returns), carried wheels are checked
against the image's Python and platform, and a part's folder packs into one archive."""
import importlib.util
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_wheels_are_checked_against_the_image(tmp_path):
    for name in ("liger_kernel-0.8.5-py3-none-any.whl", "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
                 "regex-2025.1.1-cp311-cp311-manylinux_2_17_x86_64.whl", "numpy-2.3.5-cp312-cp312-macosx_14_0_arm64.whl",
                 "liger_kernel-0.8.4-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    problems = gpu_check.wheel_problems(str(tmp_path))
    assert len(problems) == 3, problems
    assert any("regex" in p and "cp311" in p for p in problems)
    assert any("numpy" in p and "macosx" in p for p in problems)
    assert any("second version of liger_kernel" in p for p in problems)


def test_a_part_packs_into_one_returnable_archive(tmp_path):
    top = tmp_path / "NVIDIA_H100_80GB_HBM3-20261124"
    (top / "ops-a").mkdir(parents=True)
    (top / "ops-a" / "summary.md").write_text("# results\n")
    path = gpu_check.export(str(top), "ops-a", str(tmp_path / "out"))
    assert gpu_check.SAFE_NAME.match(os.path.basename(path))
    with tarfile.open(path) as tar:
        assert tar.getnames()[-1] == "NVIDIA_H100_80GB_HBM3-20261124/ops-a/summary.md"


def test_smoke_dry_run_checks_the_plan():
    """--part smoke --dry-run --budget 420 (the whole dry run: commands, gpu tests collected, every benchmark in
    a part, archive names), and for the smoke part: every step's target imports, the caps fit the budget, the files
    that come back fit the device tool's limits."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--part", "smoke", "--dry-run",
                        "--budget", "420"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gpu tests collected" in r.stdout and r.stdout.rstrip().endswith("ok")
    assert gpu_check.smoke_plan_problems(420) == []
    total = sum(cap for _, cap, _ in gpu_check.SMOKE)
    assert gpu_check.smoke_plan_problems(total - 1) and "over the budget" in gpu_check.smoke_plan_problems(total - 1)[0]
    assert [name for name, _, _ in gpu_check.SMOKE][:2] == ["setup", "correctness"]


def test_smoke_plan_names_a_step_that_cannot_run(monkeypatch):
    monkeypatch.setattr(gpu_check, "SMOKE", gpu_check.SMOKE + (("bogus", 1, "benchmarks.no_such_module:f"),
                                                               ("nowhere", 1, None)))
    problems = gpu_check.smoke_plan_problems(10_000)
    assert any("bogus" in p and "does not import" in p for p in problems), problems
    assert any("nowhere" in p and "runs nowhere" in p for p in problems), problems


def test_smoke_rehearsal_runs_every_step_on_cpu(tmp_path):
    """The smoke run's code, every step, on CPU at tiny sizes (the kernels under the Triton interpreter): what a
    GPU lease runs has run before. Every step leaves rows, none is an error, each row carries the environment."""
    import json

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--part", "smoke", "--rehearse",
                        "--export", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    steps = {row["step"] for row in rows}
    assert steps == {name for name, _, _ in gpu_check.SMOKE}, steps
    bad = [row for row in rows if row["status"] in ("error", "FAIL", "timeout")]
    assert not bad, json.dumps(bad, indent=1)[:3000]
    assert all({"commit", "date", "torch", "device_name"} <= set(row) for row in rows)
    cases = {row["case"] for row in rows if row["step"] == "correctness"}
    for kernel in ("attention causal GQA", "attention decode (flash-decoding, KV cache)", "rms_norm", "layer_norm",
                   "add_layer_norm (BERT sublayer output)",
                   "apply_rope GQA", "swiglu", "geglu tanh", "gelu tanh with bias (GPT-2 MLP)",
                   "fused_linear_cross_entropy V=128256", "lora_linear over NF4", "nf4 quantise/dequantise bytes"):
        assert kernel in cases
    assert (tmp_path / "smoke.log").read_text().count("smoke: step") >= len(gpu_check.SMOKE)


def test_a_step_over_its_cap_is_killed_and_recorded(tmp_path):
    """A hung step costs its cap only: killed, a timeout row, and the next step still runs."""
    import json

    from benchmarks import smoke

    steps = (("hang", 8, "tests.smoke_steps:hang"), ("after", 30, "tests.smoke_steps:quick"))
    unfinished = smoke.run_steps(steps, 60, str(tmp_path), lambda m: None, device="cpu", tiny=True)
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert unfinished == 1
    assert [(r["step"], r["case"], r["status"]) for r in rows] == [
        ("hang", "before the hang", "ok"), ("hang", "(step)", "timeout"), ("after", "ran", "ok")]
