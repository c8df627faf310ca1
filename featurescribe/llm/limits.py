"""Rate limits: requests-per-minute and tokens-per-minute token buckets, and a concurrency cap.

The buckets are shared by every client of the same `backend:model` in the process
(`shared_limiter`) and are loop-agnostic: a thread lock guards their arithmetic and a caller
waits with `asyncio.sleep`, so clients on different event loops (Prefect task runners) share
them safely. A reservation may drive a bucket below zero; each caller then waits its own
computed time, so waiting callers proceed in arrival order without polling.

A 429 with Retry-After pauses the whole `backend:model` until then (`pause`), so one rate-limit
answer does not turn into a stampede of further 429s.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from contextlib import asynccontextmanager
from typing import AsyncIterator


class TokenBucket:
    """`per_minute` units a minute, bursting up to `burst_s` seconds' worth (at least 1 unit)."""

    def __init__(self, per_minute: float, burst_s: float = 10.0):
        if per_minute <= 0:
            raise ValueError("a rate limit must be > 0")
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = self.capacity
        self.t = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def reserve(self, n: float = 1.0) -> float:
        """Take `n` units now; return how many seconds the caller must wait before using them."""
        with self._lock:
            now = time.monotonic()
            self._refill(now)
            self.tokens -= min(float(n), self.capacity)
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def give_back(self, n: float) -> None:
        """Return units reserved but not used (an estimate that was too high)."""
        with self._lock:
            self._refill(time.monotonic())
            self.tokens = min(self.capacity, self.tokens + float(n))

    def take_more(self, n: float) -> None:
        """Charge units used beyond the reservation (an estimate that was too low)."""
        with self._lock:
            self._refill(time.monotonic())
            self.tokens -= float(n)


class RateLimiter:
    """RPM and TPM limits (None: unlimited) and a shared pause for one backend:model."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None):
        self._lock = threading.Lock()
        self.rpm: TokenBucket | None = None
        self.tpm: TokenBucket | None = None
        self._paused_until = 0.0
        self.configure(rpm, tpm)

    def configure(self, rpm: float | None = None, tpm: float | None = None) -> None:
        """Set limits; a limit already set is only ever lowered (the strictest client wins)."""
        with self._lock:
            if rpm is not None and (self.rpm is None or rpm < self.rpm.per_minute):
                self.rpm = TokenBucket(rpm)
            if tpm is not None and (self.tpm is None or tpm < self.tpm.per_minute):
                self.tpm = TokenBucket(tpm)

    def pause(self, seconds: float) -> None:
        """No request of this backend:model starts for `seconds` (a 429's Retry-After)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + max(0.0, seconds))

    async def acquire(self, est_tokens: int) -> None:
        """Wait until a request of about `est_tokens` tokens may start."""
        wait = 0.0
        if self.rpm is not None:
            wait = max(wait, self.rpm.reserve(1))
        if self.tpm is not None:
            wait = max(wait, self.tpm.reserve(est_tokens))
        with self._lock:
            wait = max(wait, self._paused_until - time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)

    def settle(self, est_tokens: int, used_tokens: int) -> None:
        """Correct the TPM bucket once the real token count of a request is known."""
        if self.tpm is None:
            return
        if used_tokens < est_tokens:
            self.tpm.give_back(est_tokens - used_tokens)
        elif used_tokens > est_tokens:
            self.tpm.take_more(used_tokens - est_tokens)


_REGISTRY: dict[str, RateLimiter] = {}
_REGISTRY_LOCK = threading.Lock()


def shared_limiter(backend: str, model: str, rpm: float | None = None, tpm: float | None = None) -> RateLimiter:
    """The process-wide limiter of `backend:model`, configured with these limits."""
    key = f"{backend}:{model}"
    with _REGISTRY_LOCK:
        lim = _REGISTRY.get(key)
        if lim is None:
            lim = _REGISTRY[key] = RateLimiter()
    lim.configure(rpm, tpm)
    return lim


def reset_shared_limiters() -> None:
    """Forget every shared limiter (tests)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()


class LoopSemaphore:
    """An asyncio.Semaphore per event loop, so one client can serve several loops."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("concurrency must be >= 1")
        self.n = n
        self._by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            sem = self._by_loop.get(loop)
            if sem is None:
                sem = self._by_loop[loop] = asyncio.Semaphore(self.n)
        return sem


class LoopKeyLocks:
    """An asyncio.Lock per key and event loop, dropped once no caller holds or waits for it:
    callers with the same key take turns, others do not wait."""

    def __init__(self):
        self._by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with self._lock:
            locks = self._by_loop.setdefault(loop, {})
            lock, users = locks.get(key) or (asyncio.Lock(), 0)
            locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            with self._lock:
                users = locks[key][1] - 1
                if users:
                    locks[key] = (lock, users)
                else:
                    del locks[key]


def estimate_tokens(messages, max_tokens: int) -> int:
    """A cheap upper-ish estimate of a request's tokens: 1 per 4 characters, plus max_tokens."""
    chars = sum(len(str(m.get("content", ""))) for m in messages)
    return chars // 4 + 4 * len(messages) + int(max_tokens)
