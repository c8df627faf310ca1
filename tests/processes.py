"""Child processes the tests start (servers, a browser)."""

from __future__ import annotations

import subprocess


def end_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Ask `proc` to end (SIGTERM); kill it when it has not ended after `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
