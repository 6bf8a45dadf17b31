"""Running a test's subprocess, once more only after gloo's known abort in a process's teardown."""

from __future__ import annotations

import subprocess
from pathlib import Path

# What a gloo process prints when it aborts (SIGABRT) in its interpreter's teardown, after its work is done; seen
# in loaded CI runs of every 2-process launch, rarely, though the workers end their process group with a barrier
# (tests/ddp_worker.py, end_process_group). The cause is not known.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_launch(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """``subprocess.run`` with its output captured, run a second time only when the first ended in gloo's teardown
    abort: any other failure, and a second abort, is returned for the caller's assertion to report."""
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or GLOO_TEARDOWN_ABORT not in proc.stderr:
            break
    return proc
