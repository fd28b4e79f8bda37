"""Fixtures shared with tests/train: tests/tiny_model.py."""
from tests.tiny_model import _cpu_backends, tiny  # noqa: F401
