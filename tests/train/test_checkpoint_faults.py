"""Checkpoints under faults: a damaged checkpoint is skipped for the newest readable one (and named, with why), a
disk that fails during a save leaves the previous checkpoint whole and stops the run with one line, and a resume
with another configuration or data stops naming the difference unless --resume-force."""
import errno
import json
import os
import shutil

import pytest
import torch

from fastnlg import cli
from fastnlg.train import checkpoint, train
from fastnlg.train.distributed import Dist
from fastnlg.train.errors import CheckpointError, ConfigError
from tests.tiny_model import losses, train_config


def _cfg(tiny, out, **kw):
    # a constant schedule: a run stopped at step 4 and resumed to 6 takes the 6-step run's learning rates
    return train_config(tiny, out, **{"method": "full", "schedule": "constant", "learning_rate": 1e-3,
                                      "save_every": 2, "eval_every": 100, "keep_checkpoints": 3, **kw})


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "truncated trainable.safetensors": (lambda c: _truncate(os.path.join(c, "trainable.safetensors")),
                                        "trainable.safetensors is unreadable"),
    "missing optimizer state": (lambda c: os.remove(os.path.join(c, "optimizer.pt")), "optimizer.pt is missing"),
    "state.json not JSON": (lambda c: open(os.path.join(c, "state.json"), "w").write('{"step": 4, "data_'),
                            "state.json is unreadable (JSONDecodeError"),
}


@pytest.fixture  # function scope: after the autouse CPU backends (a module fixture would run interpreted)
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(_cfg(tiny, out, max_steps=6), log=lambda *_: None)
    return losses(out)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_for_the_newest_readable_one(tiny, tmp_path, uninterrupted, damage):
    """checkpoint-4 damaged: the resume says so, takes checkpoint-2 and gives the uninterrupted run's losses."""
    train(_cfg(tiny, tmp_path, max_steps=4), log=lambda *_: None)
    spoil, reason = DAMAGE[damage]
    spoil(str(tmp_path / "checkpoint-4"))
    logged = []
    train(_cfg(tiny, tmp_path, max_steps=6, resume=True), log=logged.append)
    skipped = [line for line in logged if line.startswith("resume: skipped")]
    assert len(skipped) == 1 and "checkpoint-4" in skipped[0] and reason in skipped[0], logged
    assert any(line.startswith("resumed from") and line.endswith("checkpoint-2 at step 2") for line in logged), logged
    # within fp32 rounding: two in-process runs of the same config already differ in the 7th digit at step 2
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(uninterrupted), rtol=1e-5, atol=0)


def test_no_readable_checkpoint_stops_naming_each(tiny, tmp_path):
    train(_cfg(tiny, tmp_path, max_steps=4), log=lambda *_: None)
    DAMAGE["missing optimizer state"][0](str(tmp_path / "checkpoint-2"))
    DAMAGE["state.json not JSON"][0](str(tmp_path / "checkpoint-4"))
    with pytest.raises(CheckpointError) as info:
        train(_cfg(tiny, tmp_path, max_steps=6, resume=True), log=lambda *_: None)
    msg = str(info.value)
    assert "no checkpoint in" in msg and "checkpoint-4: state.json is unreadable" in msg
    assert "checkpoint-2: optimizer.pt is missing" in msg


def test_read_changes_nothing_and_judges_every_rank(tiny, tmp_path):
    """read() loads a checkpoint whole; a missing RNG file of another rank makes it unreadable on every rank."""
    train(_cfg(tiny, tmp_path, max_steps=2), log=lambda *_: None)
    path = str(tmp_path / "checkpoint-2")
    saved = checkpoint.read(path)
    assert saved["state"]["step"] == 2 and saved["trainable"] and "state" in saved["optimizer"]
    state = json.load(open(os.path.join(path, "state.json")))
    json.dump({**state, "world_size": 2}, open(os.path.join(path, "state.json"), "w"))
    with pytest.raises(CheckpointError, match="rng-1.safetensors is missing"):  # rank 0 of 2 judges rank 1's
        checkpoint.read(path, Dist(world=2, rank=0))
    with pytest.raises(ConfigError, match="written by 2 processes, resumed with 1"):  # no damage: another count
        checkpoint.read(path)


def test_a_failing_disk_during_a_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing checkpoint-4: its partial folder is removed, checkpoint-2 reads whole, the command
    stops with one line naming both, and --resume then continues from checkpoint-2."""
    real = checkpoint.save_file

    def full_disk(tensors, path, *a, **kw):
        if ".tmp-checkpoint-4" in path and path.endswith("trainable.safetensors"):
            with open(path, "wb") as f:
                f.write(b"\0" * 64)  # what a write cut short leaves
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    args = ["train", "--model", tiny["model"], "--train-files", tiny["train"], "--eval-files", tiny["eval"],
            "--output-dir", str(tmp_path), "--max-length", "96", "--batch-size", "4", "--max-steps", "6",
            "--save-every", "2", "--eval-every", "100", "--method", "full", "--schedule", "constant",
            "--learning-rate", "1e-3", "--progress", "false", "--device", "cpu", "--tensorboard", "false"]
    assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("fastnlg train: error: saving checkpoint-4 failed: No space left on device")
    assert "checkpoint-2 is intact" in err[0] and "--resume" in err[0]
    assert sorted(n for n in os.listdir(tmp_path) if "checkpoint" in n) == ["checkpoint-2"]
    assert checkpoint.read(str(tmp_path / "checkpoint-2"))["state"]["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert cli.main(args + ["--resume"]) == 0
    assert "checkpoint-6" in os.listdir(tmp_path)


def test_a_failing_disk_on_the_first_save_says_nothing_is_kept(tiny, tmp_path, monkeypatch):
    def full_disk(*_a, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="saving checkpoint-2 failed: No space left on device .* there is no "
                       "earlier checkpoint"):
        train(_cfg(tiny, tmp_path, max_steps=4), log=lambda *_: None)
    assert not [n for n in os.listdir(tmp_path) if "checkpoint" in n]


def test_resume_with_another_configuration_or_data_names_the_difference(tiny, tmp_path):
    data = tmp_path / "train.jsonl"
    shutil.copy(tiny["train"], data)
    out = tmp_path / "run"
    train(_cfg(tiny, out, max_steps=2, train_files=[str(data)]), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"differs from .*checkpoint-2: learning_rate 0\.001 -> 0\.002\. .*"
                       "--resume-force"):
        train(_cfg(tiny, out, max_steps=4, train_files=[str(data)], learning_rate=2e-3, resume=True),
              log=lambda *_: None)
    with pytest.raises(ConfigError, match="lora_r 8 -> 4"):  # before the adapter's shapes could mismatch
        train(_cfg(tiny, out, max_steps=4, train_files=[str(data)], method="lora", lora_r=4, resume=True),
              log=lambda *_: None)
    with open(data, "a") as f:
        f.write(open(tiny["train"]).readline())
    with pytest.raises(ConfigError, match=f"the data file {data} has changed"):
        train(_cfg(tiny, out, max_steps=4, train_files=[str(data)], resume=True), log=lambda *_: None)
    logged = []  # what may change: how long it runs and how it logs
    train(_cfg(tiny, out, max_steps=4, train_files=[str(data)], learning_rate=2e-3, log_every=2, resume=True,
               resume_force=True), log=logged.append)
    assert any("--resume-force" in line and "learning_rate 0.001 -> 0.002" in line and "has changed" in line
               for line in logged), logged
    assert "checkpoint-4" in os.listdir(out)


def test_only_rank_0_hashes_the_data_files(monkeypatch):
    """Rank 0 alone writes state.json, so the other ranks do not hash the data files (gigabytes, on every
    rank's first save) for a fingerprint they would throw away."""
    from types import SimpleNamespace

    from fastnlg.train import trainer

    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saved.append(a[6]))
    monkeypatch.setattr(checkpoint, "fingerprint", lambda files: pytest.fail("a rank other than 0 hashed the data"))
    cfg = SimpleNamespace(output_dir="out", keep_checkpoints=2)
    run = SimpleNamespace(cfg=cfg, step=3, model=None, optimizer=None, scheduler=None, scaler=None, state={},
                          batches=SimpleNamespace(position=lambda: 0), dist=SimpleNamespace(main=False))
    monkeypatch.setattr(trainer.dataclasses, "asdict", lambda c: {"output_dir": c.output_dir})
    trainer.Run.save_checkpoint(run)
    assert saved[-1]["data"] is None
    run.dist, run.data_fingerprint = SimpleNamespace(main=True), {"train.jsonl": "abc"}
    trainer.Run.save_checkpoint(run)
    assert saved[-1]["data"] == {"train.jsonl": "abc"}
