"""Progress for long steps: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable


class Progress:
    """`with Progress("harvest", total=n, unit="tok") as p: p.advance(k)`.

    On a terminal it draws a bar with the rate; elsewhere it prints a line at most every
    `every_s` seconds and one at the end, to stderr. `info()`, when given, is shown beside the
    count (e.g. calls and dollars so far). `advance` may be called from any thread.
    """

    def __init__(self, label: str, total: float | None = None, unit: str = "it", every_s: float = 5.0,
                 stream=None, enabled: bool = True, info: Callable[[], str] | None = None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.info = info
        self.done = 0.0
        self._lock = threading.Lock()
        self._bar = None
        self._task = None
        self._t0 = self._last = 0.0

    def __enter__(self) -> "Progress":
        self._t0 = self._last = time.monotonic()
        if self.enabled and self.stream.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
        return self

    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: float = 1) -> None:
        with self._lock:
            self.done += n
            if self.enabled:
                self._show(n)

    def _show(self, n: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=self._rate_text())
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line()

    def _rate_text(self) -> str:
        rate = f"{self.rate():,.1f}" if self.rate() < 10 else f"{self.rate():,.0f}"
        return f"{rate} {self.unit}/s" + (f", {self.info()}" if self.info else "")

    def _line(self) -> None:
        total = f"/{self.total:,.0f}" if self.total else ""
        print(f"{self.label}: {self.done:,.0f}{total} {self.unit} ({self._rate_text()})",
              file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled:
            self._line()
