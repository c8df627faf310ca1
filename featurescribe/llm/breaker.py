"""The circuit breaker of one backend: stop a run whose judge cannot answer, before it spends more.

Every failed attempt the client sees (retries included) is counted by its kind. When `limit`
attempts in a row (the first `limit` of a run included) failed with the same kind, the backend is
broken: the breaker raises `BackendBroken`, one line naming the backend, its URL and the kind, and
every later call of the client raises it before sending. An answer that parses ends the streak.

Kinds that depend on the request's form (unparseable answers, refused requests) are counted per
purpose, so a simulator whose answers never parse trips even while the same model explains well;
the others (transport, auth, not-found model, server, bad request) are the endpoint's and any
usable answer ends them. Rate limits are never counted: waiting is the cure.
"""

from __future__ import annotations

import threading

from featurescribe.errors import FeaturescribeError
from featurescribe.statuses import ExitStatus

DEFAULT_MAX_FAILURES = 50

# failure kind (llm/client.py `Failure.kind`) -> how the one line names it
BREAKER_KINDS = {
    "transport": "transport (connection refused, reset or timed out)",
    "auth": "auth (the API key was refused: 401/403)",
    "not_found": "not found (no such model or route: 404)",
    "parse": "unparseable answers",
    "rejected": "request rejected (the server refuses the request's form)",
    "server": "server errors (5xx)",
    "fatal": "bad request (4xx)",
}
PER_PURPOSE = ("parse", "rejected")


class BackendBroken(FeaturescribeError):
    """A backend failed `limit` attempts in a row with the same kind: the run stops."""

    exit_code = ExitStatus.ERROR

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class CircuitBreaker:
    """See the module docstring. Thread-safe: a client may serve several threads' loops."""

    def __init__(self, spec: str, url: str | None, limit: int = DEFAULT_MAX_FAILURES):
        self.spec, self.url, self.limit = spec, url, max(1, int(limit))
        self._streaks: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()
        self.tripped: BackendBroken | None = None

    def check(self) -> None:
        """Raise BackendBroken when the breaker has tripped."""
        if self.tripped is not None:
            raise self.tripped

    def succeeded(self, purpose: str) -> None:
        with self._lock:
            for key in [k for k in self._streaks if k[1] in (None, purpose)]:
                del self._streaks[key]

    def failed(self, kind: str, purpose: str, message: str) -> BackendBroken | None:
        """Count a failed attempt; the BackendBroken to raise when this one trips the breaker."""
        if kind not in BREAKER_KINDS:
            return None
        key = (kind, purpose if kind in PER_PURPOSE else None)
        with self._lock:
            n = self._streaks[key] = self._streaks.get(key, 0) + 1
            if n >= self.limit and self.tripped is None:
                self.tripped = BackendBroken(self._line(kind, purpose, n, message), kind)
            return self.tripped

    def _line(self, kind: str, purpose: str, n: int, message: str) -> str:
        where = f" at {self.url}" if self.url else ""
        what = f"{purpose} calls" if kind in PER_PURPOSE else "calls"
        return (f"{self.spec}{where} is not answering: {n} {what} in a row failed with "
                f"{BREAKER_KINDS[kind]}; last: {message}. Stopped before spending more "
                f"(--max-failures {self.limit})")
