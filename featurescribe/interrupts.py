"""SIGINT and SIGTERM: stop at once, keep what was paid for.

`featurescribe` (the entry point) installs `handling_signals()`: a signal raises `Interrupted`
(a KeyboardInterrupt, so code that cleans up after Ctrl-C cleans up after SIGTERM too) in the main
thread, and first cancels every event loop that `run_cancellable` runs, in any thread: the label
run's LLM calls stop where they are (an attempt in flight is recorded as cancelled), the clients
close and write their buffered ledger rows, and the thread pools they ran on are free to end.

Prefect swaps in its own SIGTERM handler while a flow runs (it raises `TerminationSignal`, which
DuckDB may turn into an error of its own, and then exits 0 or 1); the label flow's body puts ours
back (`ours_in_flow()`) and calls `stop_running()` on its way out, whatever the exception.

`signals_deferred()` makes a section a signal cannot split (a provider batch created and its id
recorded): a signal that arrives inside is delivered when the section ends.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
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


def received() -> int | None:
    """The signal that arrived, if one did (for code that swallows its exception: prefect.serve)."""
    return _LOOPS.stopping


def stop_if_received() -> None:
    """Raise `Interrupted` once a signal arrived: for loops on threads other than the main one
    (the shards of `harvest --shards N --task-runner thread`), where the handler raises nothing."""
    if _LOOPS.stopping is not None:
        raise Interrupted(_LOOPS.stopping)


def stop_running() -> int:
    """Cancel every loop `run_cancellable` runs; returns how many."""
    return _LOOPS.cancel_all(None)


def stop_worker_calls(for_good: bool) -> int:
    """Run on each Dask worker (`Client.run`) when the flow stops: cancel the chunks computing in
    that process; `for_good` (a cluster the flow started and is about to close): a chunk that
    starts later stops at once too."""
    return _LOOPS.cancel_all(signal.SIGTERM if for_good else None)


def as_interruption(err: BaseException) -> BaseException:
    """`Interrupted` for an error a signal caused (DuckDB answers a signal during a query with
    RuntimeError('Query interrupted')), else `err` itself."""
    if received() is not None and not is_interruption(err):
        return Interrupted(received())
    return err


def is_interruption(err: BaseException) -> bool:
    """A signal's exception: ours, Ctrl-C's, or Prefect's TerminationSignal."""
    if isinstance(err, KeyboardInterrupt):
        return True
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    return prefect_exceptions is not None and isinstance(err, prefect_exceptions.TerminationSignal)


def interruption_note(err: BaseException) -> str:
    """'stopped by SIGTERM' (or SIGINT) for an `is_interruption` exception."""
    signum = getattr(err, "signum", None) or getattr(err, "signal", None) or signal.SIGINT
    return f"stopped by {signal.Signals(signum).name}"


def exit_now(status: int) -> None:
    """End the process after a signal: the atexit handlers run (Prefect stops what it started),
    the interpreter's teardown does not: its final garbage collection of everything Prefect,
    pydantic and the SDKs imported takes seconds on a loaded machine, and a scheduler sends
    SIGKILL soon after SIGTERM. Everything of ours is written and closed before this is called."""
    sys.stdout.flush()
    sys.stderr.flush()
    _drain_prefect_services()
    atexit._run_exitfuncs()
    os._exit(int(status))


def _drain_prefect_services(timeout_s: float = 2.0) -> None:
    """Send Prefect's queued logs and events while its server is still up. The interpreter's
    teardown would do it before the atexit handlers; without it the ephemeral server's atexit
    handler stops the server first and Prefect prints 'Error logging to API'."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    if services is not None:
        services.QueueService.drain_all(timeout=timeout_s)


def _on_signal(signum: int, frame) -> None:
    _LOOPS.cancel_all(signum)
    _quiet_prefect_crash_lines()
    raise Interrupted(signum)


class PrefectCrashLines(logging.Filter):
    """Prefect's console lines on the runs a signal cut short ('Crash detected! Execution was
    interrupted by an unexpected exception: CancelledError'): our own line says what happened,
    and the runs keep their Crashed state on the Prefect server."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        message = record.getMessage()
        return "Crash detected!" not in message and "in state Crashed" not in message


def _quiet_prefect_crash_lines() -> None:
    for handler in logging.getLogger().handlers:  # the console handler Prefect puts on the root
        if not any(isinstance(f, PrefectCrashLines) for f in handler.filters):
            handler.addFilter(PrefectCrashLines())


@contextmanager
def ours_in_flow() -> Iterator[None]:
    """Inside a flow started under `handling_signals()`: our SIGTERM handler, not Prefect's."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not _on_signal:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block has ended (main thread only; elsewhere the handler
    raises nothing anyway), then go to the handlers that were there before: a paid side effect
    and the record of it happen both or neither."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` for the block (main thread only). The block starts
    with no signal received: a command run again in the same process (`main()` from Python) is not
    stopped by the signal that stopped the one before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _LOOPS.stopping = None
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
