"""The C++ CPU extension is built and is the default CPU backend where it exists."""
import os
import sys

import pytest
import torch

from fastnlg import backend


def test_extension_is_built():
    from fastnlg import _C
    from fastnlg.kernels import glu_kinds

    assert hasattr(_C, "rms_norm_fwd")
    assert (_C.GLU_SWIGLU, _C.GLU_GEGLU_TANH, _C.GLU_GEGLU_ERF) == \
        (glu_kinds.SWIGLU, glu_kinds.GEGLU_TANH, glu_kinds.GEGLU_ERF)  # the C++ header keeps the one numbering


def test_default_cpu_backend(backend_env):
    backend_env.delenv("FASTNLG_BACKEND", raising=False)
    backend_env.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 2)
    assert backend.choose("op", x, ("torch", "triton", "cpp")) == "cpp"
    assert backend.choose("op", x, ("torch", "triton", "cpp"), cpu_default_cpp=False) == "torch"
    assert backend.choose("op", x, ("torch", "triton")) == "torch"
    backend_env.setenv("TRITON_INTERPRET", "1")
    assert backend.choose("op", x, ("torch", "triton", "cpp")) == "triton"
    assert backend.choose("op", x.double(), ("torch", "triton", "cpp")) == "cpp"


def test_bad_backend_names(backend_env):
    backend_env.setenv("FASTNLG_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTNLG_BACKEND='tpu' is not one of"):
        backend.choose("op", torch.randn(1), ("torch",))
    backend_env.setenv("FASTNLG_BACKEND", "triton")
    backend_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        backend.choose("op", torch.randn(1), ("torch", "triton"))


def test_global_override_applies_where_an_op_has_the_backend(monkeypatch, backend_env):
    """FASTNLG_BACKEND=cpp can be set for a whole model: ops with a C++ kernel use it, an op without one
    keeps its default and says so once; FASTNLG_BACKEND_<OP> overrides one op and insists."""
    import warnings

    monkeypatch.setattr(backend, "_WARNED", set())
    backend_env.setenv("TRITON_INTERPRET", "0")
    backend_env.setenv("FASTNLG_BACKEND", "cpp")
    x = torch.randn(2, 2)
    assert backend.choose("rms_norm", x, ("torch", "triton", "cpp")) == "cpp"
    with pytest.warns(UserWarning, match=r"FASTNLG_BACKEND='cpp' does not apply to flash_attention \(it has: torch, "
                                         r"triton\); flash_attention keeps its default backend"):
        assert backend.choose("flash_attention", x, ("torch", "triton")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert backend.choose("flash_attention", x, ("torch", "triton")) == "torch"
    backend_env.setenv("FASTNLG_BACKEND_RMS_NORM", "torch")  # the per-op variable wins
    assert backend.choose("rms_norm", x, ("torch", "triton", "cpp")) == "torch"
    backend_env.setenv("FASTNLG_BACKEND_FLASH_ATTENTION", "cpp")
    with pytest.raises(ValueError, match="FASTNLG_BACKEND_FLASH_ATTENTION='cpp' is not implemented for this op"):
        backend.choose("flash_attention", x, ("torch", "triton"))
    backend_env.setenv("FASTNLG_BACKEND", "cpp")
    with pytest.raises(ValueError, match="FASTNLG_BACKEND='cpp' cannot run here"):  # has it, cannot run it
        backend.choose("rms_norm_other", torch.randn(2, 2, device="meta"), ("torch", "cpp"))


def test_nvcc_compiles_cuda_sources():
    """csrc/cuda/*.cu compile for every target, sm_75 to sm_120, when nvcc is present (scripts/check_nvcc.sh):
    the same list as setup.py's CUDA_ARCHS and the Triton AOT tier's."""
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
    from fastnlg import aot

    compiled = {int(line.split("sm_")[1]) for line in proc.stdout.splitlines() if line.startswith("ok:") and ".cu " in line}
    assert compiled == set(aot.ARCHS), proc.stdout


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


def test_readme_backend_table_matches_the_ops():
    """The README's table of backends per op is what the ops declare."""
    import importlib
    import os
    import re

    from fastnlg.quant import _backends as nf4

    def of(module):  # fastnlg.ops exports functions named as their modules
        return importlib.import_module(f"fastnlg.ops.{module}").BACKENDS

    declared = {"RMS_NORM": of("rms_norm"), "LAYER_NORM": of("layer_norm"), "ADD_LAYER_NORM": of("add_layer_norm"),
                "APPLY_ROPE": of("rope"),
                "CROSS_ENTROPY": of("cross_entropy"), "GLU": of("glu"), "GELU": of("gelu"),
                "FLASH_ATTENTION": of("attention"), "RELATIVE_POSITION_ATTENTION": of("relative_position_attention"),
                "LORA_LINEAR": of("lora_linear"), "QUANTIZE_NF4": nf4.BACKENDS, "DEQUANTIZE_NF4": nf4.DEQUANT_BACKENDS,
                "NF4_GEMV": ("torch", "cuda")}
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    listed = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and "(" not in cells[0].split("`")[1]:
            have = tuple(b for b, c in zip(("torch", "triton", "cpp", "cuda"), cells[1:]) if c.startswith("yes"))
            for name in re.findall(r"`([A-Z0-9_]+)`", cells[0]):
                listed[name] = have
    assert listed.keys() == declared.keys()
    for name, have in declared.items():
        assert set(listed[name]) == set(have), name
