"""fastnlg.backend: the choice is read from the environment on every call (its fast reader must see every
change at once), and the usual CPU call picks what the documented order says."""
import os

import pytest
import torch

from fastnlg import backend


def test_getenv_follows_every_change(monkeypatch):
    name = "FASTNLG_TEST_VARIABLE_Ä"  # (a non-ASCII name: the encoded key is cached)
    monkeypatch.delenv(name, raising=False)
    assert backend.getenv(name) is None
    monkeypatch.setenv(name, "cpp")
    assert backend.getenv(name) == "cpp"
    os.environ[name] = "torch"  # the same length, another value
    assert backend.getenv(name) == "torch"
    os.environ.update({name: "triton"})
    assert backend.getenv(name) == "triton"
    del os.environ[name]
    assert backend.getenv(name) is None
    for key, value in list(os.environ.items())[:50]:
        assert backend.getenv(key) == value


def test_getenv_falls_back_when_os_environ_is_replaced(monkeypatch):
    monkeypatch.setattr(os, "environ", {"FASTNLG_BACKEND": "torch"})
    assert backend.getenv("FASTNLG_BACKEND") == "torch"
    assert backend.requested_backend("rms_norm") == ("torch", "FASTNLG_BACKEND")


def test_cpu_choice_follows_the_order(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTNLG_BACKEND", raising=False)
    monkeypatch.delenv("FASTNLG_BACKEND_GLU", raising=False)
    x = torch.randn(2, 3)
    cpp = "cpp" if backend.has_cpp() else "torch"
    assert backend.choose("glu", x, ("torch", "triton", "cpp")) == cpp
    assert backend.choose("glu", x, ("torch", "triton", "cpp"), cpu_default_cpp=False) == "torch"
    assert backend.choose("flash_attention", x, ("torch", "triton")) == "torch"
    monkeypatch.setenv("FASTNLG_BACKEND_GLU", "torch")
    assert backend.choose("glu", x, ("torch", "triton", "cpp")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTNLG_BACKEND_GLU")
    expected = "triton" if backend.has_triton() else cpp
    assert backend.choose("glu", x, ("torch", "triton", "cpp")) == expected
    monkeypatch.setenv("FASTNLG_BACKEND_GLU", "fast")
    with pytest.raises(ValueError, match=r"FASTNLG_BACKEND_GLU='fast' is not one of"):
        backend.choose("glu", x, ("torch", "triton", "cpp"))
