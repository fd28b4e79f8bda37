"""--precision auto (the default): bf16 autocast on a GPU with bf16, fp16 with a gradient scaler on one without
(sm_75: T4, RTX 20), fp32 on CPU; an explicit bf16 on a GPU without it stops with one line; the ops refuse
bf16 tensors on such a GPU. The device capability is mocked: no GPU needed."""
import types

import pytest
import torch

from fastnlg import backend
from fastnlg.train.config import ConfigError, TrainConfig, resolve_precision

CUDA = torch.device("cuda", 0)


def test_auto_is_the_default_and_follows_the_device():
    assert TrainConfig().precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", CUDA, (9, 0), "NVIDIA H100") == "bf16"
    assert resolve_precision("auto", CUDA, (8, 6), "RTX 3090") == "bf16"
    assert resolve_precision("auto", CUDA, (7, 5), "Tesla T4") == "fp16"
    assert resolve_precision("fp32", CUDA, (7, 5), "Tesla T4") == "fp32"
    assert resolve_precision("fp16", CUDA, (9, 0), "NVIDIA H100") == "fp16"


def test_bf16_on_a_gpu_without_it_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"precision='bf16' is not allowed: Tesla T4 \(sm_75\) has no bf16"):
        resolve_precision("bf16", CUDA, (7, 5), "Tesla T4")
    with pytest.raises(ConfigError, match="one of"):
        resolve_precision("bf17", CUDA, (9, 0))


def test_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    """fastnlg train --precision bf16 on a T4: exit 2 (a user error) with the ConfigError's line, no traceback."""
    from fastnlg import cli
    from fastnlg.train import setup

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    monkeypatch.setattr(setup, "resolve_precision",
                        lambda p, d: resolve_precision(p, CUDA, (7, 5), "Tesla T4"))
    rc = cli.main(["train", "--model", "llama-tiny", "--train-files", str(data), "--precision", "bf16",
                   "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "has no bf16 arithmetic" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


@pytest.fixture
def gpu_of(monkeypatch):
    def set_capability(cap):
        monkeypatch.setattr(backend, "_CAPABILITY", {CUDA: cap})
    return set_capability


def _fake_cuda_tensor(dtype):
    # backend.choose reads only .device and .dtype
    return types.SimpleNamespace(device=CUDA, dtype=dtype)


def test_ops_refuse_bf16_on_a_gpu_without_it(gpu_of):
    gpu_of((7, 5))
    with pytest.raises(TypeError, match=r"rms_norm: bf16 tensors on cuda:0 \(compute capability 7.5\).*use fp16"):
        backend.choose("rms_norm", _fake_cuda_tensor(torch.bfloat16), ("torch", "triton"))
    assert backend.choose("rms_norm", _fake_cuda_tensor(torch.float16), ("torch", "triton")) in ("triton", "torch")
    gpu_of((8, 0))
    assert backend.choose("rms_norm", _fake_cuda_tensor(torch.bfloat16), ("torch", "triton")) in ("triton", "torch")


def test_cpu_bf16_is_untouched():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert backend.choose("rms_norm", x, ("torch", "cpp")) in ("torch", "cpp")
