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
def _cpu_backends(monkeypatch):
    """The CPU defaults (C++ / torch) as users run them: the Triton interpreter would take minutes a step
    (the kernels are tested under it in tests/ops). Subprocesses inherit this."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
