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


def test_dry_run_passes_on_cpu():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gpu tests collected" in r.stdout and r.stdout.rstrip().endswith("ok")


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
