"""A real tmpfs mount for tests of a full disk or a read-only folder (root and `mount` needed;
the test is skipped where they are not)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """`path` (made here) as a tmpfs mounted with `options` (e.g. "size=64k" or "ro,size=1m"),
    unmounted afterwards."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("needs root and a tmpfs mount")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def remount(path: Path, options: str) -> None:
    """Mount a `tmpfs` mount again with other options (e.g. "ro,size=1m" once its files are written)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
