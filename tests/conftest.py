"""Test configuration shared by every tier.

Without CUDA, the Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be set
before triton decorates any kernel, so it is set here, before fastnlg is imported.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastnlg import backend  # noqa: E402

CPU_BACKENDS = ("torch", "cpp", "triton")


def device_params():
    """cpu always; cuda as the gpu tier (`pytest -m gpu`), skipped without CUDA."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                               pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    ]


def backend_params():
    """(device, backend) pairs: every CPU backend on CPU tensors; triton on CUDA tensors in the gpu tier."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS]
    params.append(pytest.param("cuda", "triton", id="cuda-triton", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]))
    return params


class BackendEnv:
    """monkeypatch for the variables fastnlg.backend reads once (FASTNLG_BACKEND*, TRITON_INTERPRET): each
    change has it re-read them, and monkeypatch restores them after the test."""

    def __init__(self, monkeypatch):
        self._mp = monkeypatch

    def setenv(self, name, value):
        self._mp.setenv(name, value)
        backend.refresh()

    def delenv(self, name, raising=True):
        self._mp.delenv(name, raising=raising)
        backend.refresh()


@pytest.fixture
def backend_env(monkeypatch):
    return BackendEnv(monkeypatch)


@pytest.fixture(autouse=True)
def _backend_settings_read(monkeypatch):
    """Each test starts from the backend variables as the environment holds them, and one that set them
    without having them re-read (backend_env, backend.use) fails: it would have tested stale settings."""
    backend.refresh()
    yield
    current = {k: v for k, v in os.environ.items() if backend._is_setting(k)}
    assert backend._SETTINGS == current, (
        f"backend variables changed to {current} but fastnlg.backend still reads {backend._SETTINGS}: set them "
        "with the backend_env fixture or fastnlg.backend.use")


@pytest.fixture
def use_backend(backend_env):
    """use_backend("cpp") forces FASTNLG_BACKEND for the test; a CPU test of triton needs the interpreter."""
    def set_backend(name):
        if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
        backend_env.setenv("FASTNLG_BACKEND", name)
    return set_backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def skip_interpreter_bf16(device, backend, dtype):
    """The Triton interpreter emulates bf16 with numpy and does not round like a GPU (its errors run
    ~4x torch's rounding error, and its tl.dot is wrong for bf16): bf16 Triton runs in the gpu tier only."""
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 under the Triton interpreter is not GPU arithmetic; covered by the gpu tier")


@pytest.fixture(params=["definition", "bitsandbytes"])
def bnb_reference(request):
    """Runs a test against PEFT + bitsandbytes twice: with bitsandbytes' CPU dequantisation replaced by the NF4
    definition (every machine), and with bitsandbytes' own kernels where their self-check passes for the
    shapes the test names (skipped with the reason elsewhere). tests/bnb_oracle.py says why."""
    from tests import bnb_oracle

    def reference(shapes, blocksize=64, dtype=torch.float32, nested=True):
        if request.param == "definition":
            return bnb_oracle.dequantize_by_definition()
        for shape in shapes:
            exact, why = bnb_oracle.bnb_dequantize_is_exact(shape, blocksize, dtype, nested)
            if not exact:
                pytest.skip(why)
        return contextlib.nullcontext()
    return reference


@pytest.fixture(autouse=True, scope="session")
def _break_bnb_on_request():
    """FASTNLG_TEST_BREAK_BNB=1: bitsandbytes' CPU dequantisation made wrong for the whole run, to show that
    no verdict depends on bitsandbytes' CPU kernels being right (the guarded tests skip or use the definition)."""
    if os.environ.get("FASTNLG_TEST_BREAK_BNB") != "1":
        yield
        return
    from tests import bnb_oracle

    with bnb_oracle.broken_bnb_dequantize():
        yield


@pytest.fixture(params=["auto", "baseline", "x86-64-v3", "x86-64-v4"])
def cpu_isa(request):
    """The C++ fp32 hot loops (cross-entropy rows, activations) are built for baseline x86-64,
    x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and the CPU picks the best it has: each build runs here
    where the CPU has it, so no verdict depends on which one the CI machine would pick."""
    from fastnlg import _C

    used = _C.set_cpu_isa(request.param)
    if request.param != "auto" and used != request.param:
        _C.set_cpu_isa("auto")
        pytest.skip(f"this CPU has no {request.param} (it runs {used})")
    yield used
    _C.set_cpu_isa("auto")


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: the run's own items
def pytest_collection_modifyitems(session, config, items):
    """The AOT compile check runs last, its compile started in the background now (tests/aot/background.py):
    it costs the run little wall time beside the other tests."""
    from tests.aot import background

    aot = [item for item in items if item.nodeid.endswith(background.TEST)]
    if not aot:
        return
    items.remove(aot[0])
    items.append(aot[0])
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        background.start(workers=1 if len(items) > 100 else None)  # (a few tests beside it: every CPU)


def pytest_sessionfinish(session, exitstatus):
    from tests.aot import background

    background.stop()
