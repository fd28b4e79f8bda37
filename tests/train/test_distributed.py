"""Two processes on CPU (gloo) through the command (`fastnlg train --nproc 2`, which runs torchrun): DDP and
FSDP2 give the losses and the adapter of one process running the same global batch, only rank 0 writes, and
a distributed run resumes exactly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _train(tiny, out, *extra):
    args = [sys.executable, "-m", "fastnlg.cli", "train", "--model", tiny["model"], "--train-files", tiny["train"],
            "--eval-files", tiny["eval"], "--output-dir", str(out), "--max-length", "96", "--max-steps", "4",
            "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--method", "lora", "--lora-dropout", "0",
            "--learning-rate", "1e-2", "--progress", "false", "--device", "cpu", *extra]
    # the CPU defaults (C++ / torch), also for the module-scoped `single` run, which starts before the
    # function-scoped _cpu_backends fixture sets them: under the Triton interpreter a step takes minutes
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _metrics(out, key):
    return [r[key] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in r]


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _train(tiny, out, "--batch-size", "4")
    return out


# FSDP (with its multi-process resume) is the slow tier's: two more process groups, ~30 s of the default tier
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_equal_one(tiny, single, tmp_path, mode):
    out = tmp_path / mode
    r = _train(tiny, out, "--batch-size", "2", "--nproc", "2", "--distributed", mode)
    assert r.stdout.count("fastnlg.patch") == 1 and "x 2 processes" in r.stdout  # rank 0 alone logs
    for key in ("loss", "eval_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(_metrics(out, key)), torch.tensor(_metrics(single, key)),
                                   rtol=2e-5, atol=1e-6, msg=key)
    ours, ref = (load_file(os.path.join(o, "adapter", "adapter_model.safetensors")) for o in (out, single))
    assert ours.keys() == ref.keys()
    for k in ref:  # Adam divides by sqrt(v): an entry whose gradients are ~0 moves by rounding noise x lr,
        # so entries may differ by ~lr; the tensor as a whole must be the same update
        err = (ours[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp_min(1e-12)
        assert err < 2e-3, (k, float(err))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(n for n in os.listdir(out / "checkpoint-4") if n.startswith("rng-")) == \
        ["rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"]
    if mode == "fsdp":  # resume from the step-2 checkpoint of the same run: the same steps 3 and 4
        again = tmp_path / "again"
        shutil.copytree(out, again)
        shutil.rmtree(again / "checkpoint-4")
        _train(tiny, again, "--batch-size", "2", "--nproc", "2", "--distributed", mode, "--resume")
        assert _metrics(again, "loss") == _metrics(out, "loss")
        a, b = (load_file(os.path.join(o, "adapter", "adapter_model.safetensors")) for o in (again, out))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_process_count_is_refused(tiny, single, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(single, out)
    args = [sys.executable, "-m", "fastnlg.cli", "train", "--model", tiny["model"], "--train-files", tiny["train"],
            "--output-dir", str(out), "--max-length", "96", "--max-steps", "4", "--batch-size", "2", "--nproc", "2",
            "--progress", "false", "--device", "cpu", "--resume"]
    # the CPU defaults (C++ / torch), also for the module-scoped `single` run, which starts before the
    # function-scoped _cpu_backends fixture sets them: under the Triton interpreter a step takes minutes
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert r.returncode != 0 and "fastnlg train: error: resume: " in r.stderr and "written by 1 processes, resumed with 2" in r.stderr
