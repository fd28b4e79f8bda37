"""fastnlg.backend: the variables are read once (refresh, use re-read them; use restores them), and the
usual CPU call picks what the documented order says."""
import os
import timeit

import pytest
import torch

from fastnlg import backend


def test_settings_are_read_once_and_re_read_on_refresh(monkeypatch):
    monkeypatch.setenv("FASTNLG_BACKEND_GLU", "cpp")
    backend.refresh()
    monkeypatch.setenv("FASTNLG_BACKEND_GLU", "torch")  # not read until refresh
    assert backend.requested_backend("glu") == ("cpp", "FASTNLG_BACKEND_GLU")
    backend.refresh()
    assert backend.requested_backend("glu") == ("torch", "FASTNLG_BACKEND_GLU")
    monkeypatch.delenv("FASTNLG_BACKEND_GLU")
    backend.refresh()
    assert backend.getenv("FASTNLG_BACKEND_GLU") is None
    assert backend.getenv("PATH") is None  # only the backend variables are held


def test_use_sets_and_restores(monkeypatch):
    monkeypatch.setenv("FASTNLG_BACKEND", "torch")
    monkeypatch.delenv("FASTNLG_BACKEND_RMS_NORM", raising=False)
    backend.refresh()
    x = torch.randn(2, 3)
    with backend.use("cpp", op="rms_norm"):
        assert os.environ["FASTNLG_BACKEND_RMS_NORM"] == "cpp"  # subprocesses see it
        assert backend.requested_backend("rms_norm") == ("cpp", "FASTNLG_BACKEND_RMS_NORM")
        with backend.use(None):  # lifts the global override inside
            assert "FASTNLG_BACKEND" not in os.environ
            assert backend.requested_backend("glu") == (None, "FASTNLG_BACKEND")
        assert backend.requested_backend("glu") == ("torch", "FASTNLG_BACKEND")
    assert "FASTNLG_BACKEND_RMS_NORM" not in os.environ
    assert backend.requested_backend("rms_norm") == ("torch", "FASTNLG_BACKEND")
    with backend.use(interpret=False):
        assert backend.choose("flash_attention", x, ("torch", "triton")) == "torch"
    with pytest.raises(ValueError, match=r"use\(backend='fast'\): not one of"):
        with backend.use("fast"):
            pass
    with pytest.raises(RuntimeError):  # restored on an exception too
        with backend.use("cpp", op="glu"):
            raise RuntimeError
    assert backend.getenv("FASTNLG_BACKEND_GLU") is None


def test_the_choice_costs_a_dict_lookup():
    """choose() runs a few times per layer on every call: its settings read stays far below os.environ's
    (which encodes the key and decodes the value each time); measured side by side, best of 5."""
    ours = min(timeit.repeat(lambda: backend.getenv("FASTNLG_BACKEND"), number=20000, repeat=5))
    environ = min(timeit.repeat(lambda: os.environ.get("FASTNLG_BACKEND"), number=20000, repeat=5))
    assert ours < environ, (ours, environ)


def test_cpu_choice_follows_the_order(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")
    backend_env.delenv("FASTNLG_BACKEND", raising=False)
    backend_env.delenv("FASTNLG_BACKEND_GLU", raising=False)
    x = torch.randn(2, 3)
    cpp = "cpp" if backend.has_cpp() else "torch"
    assert backend.choose("glu", x, ("torch", "triton", "cpp")) == cpp
    assert backend.choose("glu", x, ("torch", "triton", "cpp"), cpu_default_cpp=False) == "torch"
    assert backend.choose("flash_attention", x, ("torch", "triton")) == "torch"
    backend_env.setenv("FASTNLG_BACKEND_GLU", "torch")
    assert backend.choose("glu", x, ("torch", "triton", "cpp")) == "torch"
    backend_env.setenv("TRITON_INTERPRET", "1")
    backend_env.delenv("FASTNLG_BACKEND_GLU")
    expected = "triton" if backend.has_triton() else cpp
    assert backend.choose("glu", x, ("torch", "triton", "cpp")) == expected
    backend_env.setenv("FASTNLG_BACKEND_GLU", "fast")
    with pytest.raises(ValueError, match=r"FASTNLG_BACKEND_GLU='fast' is not one of"):
        backend.choose("glu", x, ("torch", "triton", "cpp"))
