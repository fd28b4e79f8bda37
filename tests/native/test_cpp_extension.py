"""The C++ CPU extension is built and is the default CPU backend where it exists."""
import os
import sys

import pytest
import torch

from fastnlg import backend


def test_extension_is_built():
    from fastnlg import _C

    assert _C.GLU_SWIGLU == 0 and hasattr(_C, "rms_norm_fwd")


def test_default_cpu_backend(monkeypatch):
    monkeypatch.delenv("FASTNLG_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 2)
    assert backend.choose("op", x, ("torch", "triton", "cpp")) == "cpp"
    assert backend.choose("op", x, ("torch", "triton", "cpp"), cpu_default_cpp=False) == "torch"
    assert backend.choose("op", x, ("torch", "triton")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose("op", x, ("torch", "triton", "cpp")) == "triton"
    assert backend.choose("op", x.double(), ("torch", "triton", "cpp")) == "cpp"


def test_bad_backend_names(monkeypatch):
    monkeypatch.setenv("FASTNLG_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTNLG_BACKEND='tpu' is not one of"):
        backend.choose("op", torch.randn(1), ("torch",))
    monkeypatch.setenv("FASTNLG_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        backend.choose("op", torch.randn(1), ("torch", "triton"))


def test_nvcc_compiles_cuda_sources():
    """csrc/cuda/*.cu compile for sm_80/86/89/90 when nvcc is present (scripts/check_nvcc.sh)."""
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    cuda_dir = os.path.join(root, "csrc", "cuda")
    sources = [f for f in os.listdir(cuda_dir) if f.endswith(".cu")] if os.path.isdir(cuda_dir) else []
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    if not sources:
        pytest.skip("csrc/cuda has no CUDA sources yet")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "check_nvcc.sh")], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_cuda_extension_builds_and_links(tmp_path):
    """FASTNLG_BUILD_CUDA=1 builds fastnlg._C_cuda (nvcc objects + pybind11 bindings, linked to cudart)."""
    import shutil
    import subprocess

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env = dict(os.environ, FASTNLG_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"), "--build-lib",
                           str(tmp_path / "lib")], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((tmp_path / "lib" / "fastnlg").glob("_C_cuda*.so"))
