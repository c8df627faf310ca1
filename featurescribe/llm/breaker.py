"""The circuit breaker of one backend: stop a run whose judge cannot answer, before it spends more.

Every failed attempt the client sees (retries included) is counted by its kind. When `limit`
attempts in a row (the first `limit` of a run included) failed with the same kind, the backend is
broken: the breaker raises `BackendBroken`, one line naming the backend, its URL and the kind, and
every later call of the client raises it before sending. An answer that parses ends the streak.

Kinds that depend on the request's form (unparseable answers, refused requests) are counted per
purpose, so a simulator whose answers never parse trips even while the same model explains well;
the others (transport, not-found model, server, bad request) are the endpoint's and any
usable answer ends them.

Rate limits: a 429 (with or without Retry-After) counts, but trips only once the streak has also
lasted `rate_limit_patience_s` (default 120 s, about what one call's own rate-limit retries wait), so
a short burst waits and goes on, as does a steady limit that lets some requests through (each answer
ends the streak), while a provider that refuses every request (a daily cap reached) stops the run.

Two kinds trip at the first answer, since no retry can mend them: an exhausted quota (OpenAI's 429
`insufficient_quota`, Anthropic's 402 billing error or 429 spend limit), as `QuotaExhausted`, and a
refused key (401/403), as `LLMAuthFailed`, exit status 2 like a missing key.
"""

from __future__ import annotations

import threading
import time

from featurescribe.errors import FeaturescribeError
from featurescribe.statuses import ExitStatus

DEFAULT_MAX_FAILURES = 50
DEFAULT_RATE_LIMIT_PATIENCE_S = 120.0

# failure kind (llm/client.py `Failure.kind`) -> how the one line names it
BREAKER_KINDS = {
    "transport": "transport (connection refused, reset or timed out)",
    "auth": "auth (the API key was refused: 401/403)",
    "not_found": "not found (no such model or route: 404)",
    "parse": "unparseable answers",
    "rejected": "request rejected (the server refuses the request's form)",
    "server": "server errors (5xx)",
    "fatal": "bad request (4xx)",
    "rate_limit": "rate limits (429)",
    "quota": "the account's quota or billing exhausted",
}
PER_PURPOSE = ("parse", "rejected")
QUOTA = "quota"


class BackendBroken(FeaturescribeError):
    """A backend failed `limit` attempts in a row with the same kind: the run stops."""

    exit_code = ExitStatus.ERROR

    def __init__(self, message: str, kind: str, exit_code: int | None = None):
        super().__init__(message)
        self.kind = kind
        if exit_code is not None:  # raised again from a chunk's result, which keeps only these two
            self.exit_code = ExitStatus(exit_code)


class QuotaExhausted(BackendBroken):
    """The provider says the account has no quota or credit left (or hit its spend limit): the
    run stops at the first such answer, with exit status 1 as for any backend that cannot answer."""

    def __init__(self, message: str):
        super().__init__(message, QUOTA)


class LLMAuthFailed(BackendBroken):
    """The provider refused the API key (401/403): the run stops at the first such answer with exit
    status 2, a condition the user fixes, as a missing key is."""

    exit_code = ExitStatus.USAGE

    def __init__(self, message: str):
        super().__init__(message, "auth")


# kind -> the error raised at its first answer, and how its line reads
_AT_ONCE = {
    QUOTA: (QuotaExhausted, "the account's quota or billing is exhausted ({message}); add credit or raise "
                            "the account's spend limit, then run the same command again"),
    "auth": (LLMAuthFailed, "the provider refused the API key ({message}); check the key (and that it may use "
                         "this model), then run the same command again"),
}


class CircuitBreaker:
    """See the module docstring. Thread-safe: a client may serve several threads' loops."""

    def __init__(self, spec: str, url: str | None, limit: int = DEFAULT_MAX_FAILURES,
                 rate_limit_patience_s: float = DEFAULT_RATE_LIMIT_PATIENCE_S):
        self.spec, self.url, self.limit = spec, url, max(1, int(limit))
        self.rate_limit_patience_s = max(0.0, float(rate_limit_patience_s))
        self._streaks: dict[tuple[str, str | None], int] = {}
        self._since: dict[tuple[str, str | None], float] = {}  # when each streak began (monotonic)
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
                self._since.pop(key, None)

    def failed(self, kind: str, purpose: str, message: str) -> BackendBroken | None:
        """Count a failed attempt; the BackendBroken to raise when this one trips the breaker."""
        if kind not in BREAKER_KINDS:
            return None
        key = (kind, purpose if kind in PER_PURPOSE else None)
        now = time.monotonic()
        with self._lock:
            n = self._streaks[key] = self._streaks.get(key, 0) + 1
            lasted = now - self._since.setdefault(key, now)
            if self.tripped is None and self._trips(kind, n, lasted):
                self.tripped = (self._at_once(kind, message) if kind in _AT_ONCE
                                else BackendBroken(self._line(kind, purpose, n, lasted, message), kind))
            return self.tripped

    def _trips(self, kind: str, n: int, lasted: float) -> bool:
        if kind in _AT_ONCE:
            return True
        if kind == "rate_limit" and lasted < self.rate_limit_patience_s:
            return False
        return n >= self.limit

    def _where(self) -> str:
        return f" at {self.url}" if self.url else ""

    def _line(self, kind: str, purpose: str, n: int, lasted: float, message: str) -> str:
        what = f"{purpose} calls" if kind in PER_PURPOSE else "calls"
        over = f" over {lasted:.0f} s" if kind == "rate_limit" else ""
        return (f"{self.spec}{self._where()} is not answering: {n} {what} in a row{over} failed with "
                f"{BREAKER_KINDS[kind]}; last: {message}. Stopped before spending more "
                f"(--max-failures {self.limit})")

    def _at_once(self, kind: str, message: str) -> BackendBroken:
        error, line = _AT_ONCE[kind]
        return error(f"{self.spec}{self._where()}: {line.format(message=message)}. Stopped at the first such answer")
