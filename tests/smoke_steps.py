"""Steps for tests/test_gpu_check.py's test of the smoke run's caps (run as children by benchmarks/smoke.py)."""
import time


def hang(ctx):
    ctx.row("before the hang", "ok")
    time.sleep(60)


def quick(ctx):
    ctx.row("ran", "ok")
