"""Fixtures for the trainer and CLI tests (tests/train, tests/cli import them in their conftest.py): a tiny
Llama-style model and BPE tokenizer (the demo's builder at a small size) with its data files, and the CPU
backends users run."""
import pytest

from fastnlg import demo

TINY = dict(examples=160, hidden=32, layers=2, heads=4, inter=64, vocab=300, max_length=96, eval_records=8)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = demo.write_data(str(root / "data"), TINY)
    base = demo.build_base(str(root / "base"), paths["text"], TINY)
    return {"model": base, **paths}


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    """The CPU defaults (C++ / torch) as users run them: the Triton interpreter would take minutes a step
    (the kernels are tested under it in tests/ops). Subprocesses inherit this."""
    backend_env.setenv("TRITON_INTERPRET", "0")


def train_config(tiny, out, **overrides):
    """A TrainConfig for the tiny model and data: CPU, quiet, 4 steps logged each, overrides on top."""
    from fastnlg.train import TrainConfig

    base = dict(model=tiny["model"], train_files=[tiny["train"]], eval_files=[tiny["eval"]], output_dir=str(out),
                max_length=96, batch_size=4, max_steps=4, log_every=1, eval_every=4, save_every=4,
                learning_rate=1e-2, progress=False, device="cpu", tensorboard=False)
    return TrainConfig.from_dict({**base, **overrides})


def metrics(out) -> list:
    import json
    import os

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out) -> list:
    """The logged training losses of a run's metrics.jsonl."""
    return [r["loss"] for r in metrics(out) if "loss" in r]
