"""What a backend provides to the client."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Callable

from featurescribe.llm.base import ChatRequest, ChatResponse


class BadAnswer(Exception):
    """The server answered 200 with a body that is not a completion (retried like a 5xx)."""


class Backend:
    backend: str = ""
    model: str = ""
    supports_logprobs: bool = False
    supports_candidate_probs: bool = False
    # apply the client's per-attempt timeout (remote APIs); local generation is not interruptible
    uses_timeout: bool = True
    # ask a truncated answer again with twice the max_tokens (a small local model that rambles
    # would only ramble longer: it is asked again, sampling, at the same length)
    grow_on_truncation: bool = True
    endpoint: str | None = None  # the URL requests go to (named when the circuit breaker trips)

    async def send(
        self, request: ChatRequest, *, max_tokens: int, timeout: float, retry_index: int = 0
    ) -> ChatResponse:
        """One attempt. Raises the SDK's own exceptions; the client classifies them."""
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class PerLoop:
    """One SDK client per event loop: httpx connection pools belong to the loop that made them."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory = factory
        self._by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            obj = self._by_loop.get(loop)
            if obj is None:
                obj = self._by_loop[loop] = self._factory()
        return obj

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        with self._lock:
            obj = self._by_loop.pop(loop, None)
        if obj is not None:
            await obj.close()


class Shards:
    """A few SDK clients used in turn. httpx's connection pool scans all its connections on every
    request, so one pool of C connections costs O(C) per request; k pools of C/k cost O(C/k)."""

    def __init__(self, clients: list):
        self.clients = clients
        self._i = 0

    def next(self):
        self._i = (self._i + 1) % len(self.clients)
        return self.clients[self._i]

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
