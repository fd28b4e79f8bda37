"""The AOT compile check (`python -m fastnlg.aot`) as a background process for the test run: it compiles on
one CPU, at low priority, while the other tests run, and test_all_kernels_compile_for_all_targets (moved to
the end of the run by tests/conftest.py) waits for it. Run alone, that test compiles on every CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

TEST = "test_aot_compile.py::test_all_kernels_compile_for_all_targets"
_job: dict = {}


def start(workers: int | None) -> None:
    """Starts the compile (once per test run); the JSON rows and the output go to a temporary folder."""
    if _job:
        return
    folder = tempfile.mkdtemp(prefix="fastnlg-aot-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels, not the interpreter
    cmd = [sys.executable, "-m", "fastnlg.aot", "--json", os.path.join(folder, "aot.json")]
    if workers:
        cmd += ["--workers", str(workers)]
    log = open(os.path.join(folder, "aot.log"), "w")
    nice = (lambda: os.nice(10)) if workers and hasattr(os, "nice") else None  # the foreground tests come first
    _job.update(folder=folder, log=log, started=time.monotonic(),
                proc=subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=nice))


def result(timeout: float) -> tuple[int, list, str]:
    """-> (exit code, the JSON rows, the last of its output), starting the compile here if nothing did."""
    start(None)
    proc = _job["proc"]
    try:
        code = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - _job["started"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    _job["log"].flush()
    out = os.path.join(_job["folder"], "aot.json")
    rows = json.load(open(out)) if os.path.exists(out) and os.path.getsize(out) else []
    text = open(os.path.join(_job["folder"], "aot.log")).read()
    return code, rows, text[-3000:]


def stop() -> None:
    """At the end of the test run: a compile still running (the run stopped early) is killed."""
    proc = _job.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if _job:
        _job["log"].close()
