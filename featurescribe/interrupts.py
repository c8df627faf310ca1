"""SIGINT and SIGTERM: stop at once, keep what was paid for.

`featurescribe` (the entry point) installs `handling_signals()`: a signal raises `Interrupted`
(a KeyboardInterrupt, so code that cleans up after Ctrl-C cleans up after SIGTERM too) in the main
thread, and first cancels every event loop that `run_cancellable` runs, in any thread: the label
run's LLM calls stop where they are (an attempt in flight is recorded as cancelled), the clients
close and write their buffered ledger rows, and the thread pools they ran on are free to end.

Prefect swaps in its own SIGTERM handler while a flow runs (it raises `TerminationSignal`); the
label flow calls `stop_running()` on its way out, so that path cancels the loops too.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Coroutine, Iterator, TypeVar

from featurescribe.statuses import ExitStatus

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> ExitStatus:
        return ExitStatus.TERMINATED if self.signum == signal.SIGTERM else ExitStatus.INTERRUPTED


class _RunningLoops:
    """The process's cancellable loops. Signals are process-wide, so this is the one piece of
    process state: a signal handler has no other way to reach a loop running in another thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tasks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Task]] = {}
        self.stopping: int | None = None  # the signal, once one arrived

    def add(self, loop, task) -> int:
        with self._lock:
            if self.stopping is not None:
                raise Interrupted(self.stopping)
            self._tasks[id(task)] = (loop, task)
            return id(task)

    def discard(self, token: int) -> None:
        with self._lock:
            self._tasks.pop(token, None)

    def cancel_all(self, signum: int | None) -> int:
        with self._lock:
            if signum is not None:
                self.stopping = signum
            running = list(self._tasks.values())
        for loop, task in running:
            if not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        return len(running)


_LOOPS = _RunningLoops()


def run_cancellable(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)`, cancelled when a signal arrives (or `stop_running()` is called)."""

    async def main() -> T:
        token = _LOOPS.add(asyncio.get_running_loop(), asyncio.current_task())
        try:
            return await coro
        finally:
            _LOOPS.discard(token)

    try:
        return asyncio.run(main())
    finally:
        coro.close()  # never awaited when the stop came first


def stop_running() -> int:
    """Cancel every loop `run_cancellable` runs; returns how many."""
    return _LOOPS.cancel_all(None)


def is_interruption(err: BaseException) -> bool:
    """A signal's exception: ours, Ctrl-C's, or Prefect's TerminationSignal."""
    if isinstance(err, KeyboardInterrupt):
        return True
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    return prefect_exceptions is not None and isinstance(err, prefect_exceptions.TerminationSignal)


def _on_signal(signum: int, frame) -> None:
    _LOOPS.cancel_all(signum)
    raise Interrupted(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` for the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
