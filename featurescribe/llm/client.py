"""The LLM client: one backend, wrapped in the cache, the budget, limits, retries and the ledger.

    client = make_client("openai:gpt-4o-mini", store=CallStore(con), run_id=run_id,
                         budget=Budget(5.0), concurrency=32)
    resp = await client.chat(ChatRequest(messages=(...,), json_schema=SCHEMA), parse=my_parse)

What one `chat` does:

1. Cache: the key is the sha256 of (backend, model, parameters, messages, json_schema,
   top_logprobs, seed). A stored answer that still parses is returned with a ledger row
   `cached` (cost 0, no HTTP call). `use_cache=False` (`--no-cache`) skips the read but still
   writes. Only successful, parseable answers are stored.
2. Budget: no new attempt starts once the run's spend reached the limit: a `budget` row is
   written and `BudgetExceeded` raised. Attempts already in flight finish and are recorded.
3. Limits: the shared RPM/TPM buckets of backend:model, then this client's concurrency slot.
4. Retries, one tenacity loop with a separate attempt budget and wait per kind of failure:
   - transport (connection errors, timeouts): jittered exponential backoff;
   - rate limit (429): waits what Retry-After / retry-after-ms says (else backoff), and pauses
     every client of the same backend:model meanwhile;
   - quota (the account has no credit or hit its spend limit: OpenAI's 429 `insufficient_quota`,
     Anthropic's 402 or 429 spend limit): never retried, it trips the circuit breaker at once;
   - server (5xx, 529 overloaded): jittered exponential backoff;
   - parse (the caller's `parse` raised UnparseableResponse, a JSON-schema answer is not JSON,
     or the answer was cut at max_tokens; a truncated answer is asked again with twice the
     max_tokens): asked again at once.
   - rejected (the server refused the request's form: `response_format`, `logprobs`, an unknown
     parameter; llm/negotiation.py): sent again at once in the weaker form the backend moved
     to, which is remembered in the database per base URL + model; with no weaker form left the
     call fails as `request rejected`, never retried as an outage.
   Other errors (400, 404, ...) are not retried; a 401/403 stops the backend at once
   (LLMAuthFailed, from the breaker).
   When a kind runs out of attempts the call ends in LLMCallFailed. A placeholder answer is
   never returned.
   Circuit breaker (llm/breaker.py): every failed attempt is counted by kind; `max_failures` in a
   row of one kind (transport, auth, not found, parse, rejected, ...) raise `BackendBroken`, which
   no labeler or scorer catches: the run stops with one line naming the backend, URL and kind.
   429s count only once their streak lasted `rate_limit_patience_s`.
5. Ledger: every attempt that reached the server gets one `llm_calls` row: `ok`, `error` (with
   the status and message) or `parse_error` (billed: tokens and cost recorded). Its
   `prompt_hash` is the cache key, `attempt` its number within the call.

The SDKs' own retries are off (max_retries=0): this is the one place that retries.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, TypeVar

from tenacity import AsyncRetrying, retry_if_exception

from featurescribe.errors import FeaturescribeError
from featurescribe.llm.backends.base import BadAnswer, Backend
from featurescribe.llm.base import (
    BudgetExceeded,
    ChatRequest,
    ChatResponse,
    LLMCallFailed,
    ModelNotFound,
    UnparseableResponse,
    parse_backend_spec,
)
from featurescribe.llm.breaker import DEFAULT_MAX_FAILURES, DEFAULT_RATE_LIMIT_PATIENCE_S, CircuitBreaker
from featurescribe.llm.budget import Budget
from featurescribe.llm.negotiation import RequestRejected
from featurescribe.llm.limits import LoopKeyLocks, LoopSemaphore, estimate_tokens, shared_limiter
from featurescribe.llm.prices import PriceTable
from featurescribe.llm.registry import BackendOptions, make_backend
from featurescribe.statuses import CallStatus
from featurescribe.store.llm_calls import CallRow, CallStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ClientSettings:
    """Knobs of a client. Tests shrink the waits; the CLI sets concurrency and the budget."""

    concurrency: int = 16  # requests this client has in flight at most
    timeout_s: float = 120.0  # per attempt (remote backends)
    rpm: float | None = None  # requests per minute for backend:model (None: no limit)
    tpm: float | None = None  # tokens per minute for backend:model (None: no limit)
    # attempts per kind of failure (the first try counts as attempt 1 of each kind)
    transport_attempts: int = 4
    rate_limit_attempts: int = 8
    server_attempts: int = 5
    max_parse_retries: int = 2  # asked again this many times after an unusable answer
    backoff_initial_s: float = 1.0  # jittered exponential backoff: initial * 2**n + U(0, jitter)
    backoff_max_s: float = 60.0
    backoff_jitter_s: float = 1.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is cut to this
    max_tokens_cap: int = 16384  # a truncated answer is asked again with up to this many
    use_cache: bool = True  # read the cache (it is always written)
    # HTTP stack under the openai SDK: "httpx" (the SDK's default) or "aiohttp" (the SDK's own
    # aiohttp transport, `openai[aiohttp]`): the same requests, errors and retries, about a third
    # less CPU per request, which is what limits one event loop on a machine with few cores
    http: str = "httpx"
    structured: str = "auto"  # --structured: auto (negotiated) | json_schema | json_object | text
    rejected_attempts: int = 6  # sends after refusals of the request's form (one per weaker form)
    max_failures: int = DEFAULT_MAX_FAILURES  # attempts in a row failing alike trip the breaker
    # a streak of 429s trips the breaker only once it lasted this long
    rate_limit_patience_s: float = DEFAULT_RATE_LIMIT_PATIENCE_S

    @classmethod
    def from_env(cls, kind: str | None = None, **overrides) -> "ClientSettings":
        """Defaults, then FEATURESCRIBE_LLM_* variables, then those for one backend kind
        (FEATURESCRIBE_LLM_TIMEOUT_OPENAI, ...), then `overrides` (None values ignored).
        FEATURESCRIBE_LLM_CONCURRENCY_<KIND> caps the concurrency an override gives too."""
        s = cls()
        for name, (var, typ) in _ENV_SETTINGS.items():
            for v in (var, f"{var}_{kind.upper()}" if kind else None):
                if v and os.environ.get(v):
                    setattr(s, name, _env_value(v, typ))
        for k, v in overrides.items():
            if v is not None:
                if not hasattr(s, k):
                    raise TypeError(f"unknown client setting {k!r}")
                setattr(s, k, v)
        cap = f"FEATURESCRIBE_LLM_CONCURRENCY_{kind.upper()}" if kind else None
        if cap and os.environ.get(cap):
            s.concurrency = min(s.concurrency, _env_value(cap, int))
        return s


_ENV_SETTINGS = {
    "concurrency": ("FEATURESCRIBE_LLM_CONCURRENCY", int),
    "timeout_s": ("FEATURESCRIBE_LLM_TIMEOUT", float),
    "rpm": ("FEATURESCRIBE_LLM_RPM", float),
    "tpm": ("FEATURESCRIBE_LLM_TPM", float),
    "max_parse_retries": ("FEATURESCRIBE_LLM_PARSE_RETRIES", int),
    "http": ("FEATURESCRIBE_LLM_HTTP", str),
    "structured": ("FEATURESCRIBE_LLM_STRUCTURED", str),
    "rate_limit_patience_s": ("FEATURESCRIBE_LLM_RATE_LIMIT_PATIENCE", float),
}


# 0: an unusable answer is not asked again; a streak of 429s trips on its count alone
_ZERO_ALLOWED = ("FEATURESCRIBE_LLM_PARSE_RETRIES", "FEATURESCRIBE_LLM_RATE_LIMIT_PATIENCE")


def _env_value(var: str, typ: type):
    try:
        value = typ(os.environ[var])
    except ValueError:
        raise FeaturescribeError(f"{var}={os.environ[var]!r} is not a valid {typ.__name__}") from None
    if typ in (int, float) and (value < 0 if var.startswith(_ZERO_ALLOWED) else value <= 0):
        least = "0 or more" if var.startswith(_ZERO_ALLOWED) else "more than 0"
        raise FeaturescribeError(f"{var} must be {least} (got {os.environ[var]!r})")
    return value


def cache_key(backend: str, model: str, request: ChatRequest) -> str:
    """sha256 of what determines an answer: backend, model, parameters, messages, schema, seed."""
    payload = {
        "backend": backend,
        "model": model,
        "params": {"max_tokens": request.max_tokens, "temperature": request.temperature},
        "messages": [dict(m) for m in request.messages],
        "json_schema": request.json_schema,
        "top_logprobs": request.top_logprobs,
        "seed": request.seed,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- failure classification
@dataclass
class Failure:
    kind: str  # transport | rate_limit | quota | server | parse | fatal | auth | not_found | rejected
    message: str
    retry_after: float | None = None
    status: int | None = None


class _Retry(Exception):
    """An attempt failed in a way worth another attempt of its kind."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from retry-after-ms or Retry-After (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
                return max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def _sdk_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# what providers answer when the account has no credit left or reached its spend limit (an
# OpenAI `code`/`type`, an Anthropic `error.type` or `error.details.error_code`): no retry helps
QUOTA_CODES = frozenset({
    "insufficient_quota",  # OpenAI, HTTP 429 "You exceeded your current quota"
    "billing_hard_limit_reached",  # OpenAI
    "billing_error",  # Anthropic, HTTP 402
    "enforced_spend_limit_reached",  # Anthropic, HTTP 429: the API tier's monthly threshold
    "contract_spend_limit_reached",  # Anthropic, HTTP 429
    "linked_organization_spend_limit_reached",  # Anthropic, HTTP 402
})


def _error_codes(exc: BaseException) -> set[str]:
    """The machine-readable codes of an SDK error: its `code`, `type` and `error_code`, and those
    of its body's `error` object (and `error.details`)."""
    found = [getattr(exc, name, None) for name in ("code", "type", "error_code")]
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict):
        details = err.get("details")
        found += [err.get("code"), err.get("type"), details.get("error_code") if isinstance(details, dict) else None]
    return {c for c in found if isinstance(c, str)}


# Anthropic's answer for an empty credit balance has been a plain 400 invalid_request_error, which
# only its message tells apart from a malformed request
_LOW_CREDIT = re.compile(r"credit balance is too low", re.IGNORECASE)


def quota_exhausted(exc: BaseException, status: int) -> bool:
    """A 402 (payment required), or an answer whose code (or, for a 400, message) says the quota or
    spend limit is used up."""
    if status == 402 or (status in (400, 403, 429) and not _error_codes(exc).isdisjoint(QUOTA_CODES)):
        return True
    return status == 400 and bool(_LOW_CREDIT.search(_sdk_message(exc)))


def classify(exc: BaseException, timeout_s: float | None = None) -> Failure | None:
    """What kind of failure an SDK exception is (None: not an API failure, a bug)."""
    name = type(exc).__name__
    if isinstance(exc, RequestRejected):
        return Failure("rejected", str(exc))
    if isinstance(exc, BadAnswer):
        return Failure("server", str(exc))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or name == "APITimeoutError":
        after = f" after {timeout_s:g} s" if timeout_s else ""
        return Failure("transport", f"timeout{after}")
    status = getattr(exc, "status_code", None)
    if name == "APIConnectionError" or (status is None and type(exc).__module__.split(".")[0] in ("httpx", "httpcore")):
        cause = exc.__cause__ or exc.__context__
        detail = f": {type(cause).__name__}" if cause is not None else ""
        return Failure("transport", f"connection error{detail}")
    if status is None:
        return None
    msg = f"HTTP {status}: {_sdk_message(exc)}"
    response = getattr(exc, "response", None)
    if quota_exhausted(exc, status):
        return Failure("quota", msg, status=status)
    if status == 429:
        ra = parse_retry_after(getattr(response, "headers", None))
        return Failure("rate_limit", msg, retry_after=ra, status=status)
    if status in (408,):
        return Failure("transport", msg, status=status)
    if status >= 500:  # 500, 502, 503, 504, 529 overloaded
        return Failure("server", msg, status=status)
    if status in (401, 403):
        return Failure("auth", msg, status=status)
    if status == 404:
        return Failure("not_found", msg, status=status)
    return Failure("fatal", msg, status=status)


def backoff_s(settings: ClientSettings, n: int) -> float:
    """Jittered exponential backoff before the n-th retry of a kind: initial * 2**(n-1) + U(0, jitter),
    at most backoff_max_s."""
    wait = settings.backoff_initial_s * 2 ** max(0, n - 1) + random.uniform(0, settings.backoff_jitter_s)
    return max(0.0, min(wait, settings.backoff_max_s))


class _Wait:
    """tenacity wait: per failure kind, backoff by that kind's own attempt count."""

    def __init__(self, settings: ClientSettings, counts: Counter):
        self.counts = counts
        self.settings = settings
        self.max_retry_after = settings.max_retry_after_s

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception()
        f: Failure = exc.failure
        if f.kind in ("parse", "rejected"):
            return 0.0
        if f.kind == "rate_limit" and f.retry_after is not None:
            ra = min(f.retry_after, self.max_retry_after)
            return ra + random.uniform(0, 0.1 * ra)
        return backoff_s(self.settings, self.counts[f.kind])


@dataclass
class _CallState:
    key: str
    request: ChatRequest
    max_tokens: int
    counts: Counter = field(default_factory=Counter)
    attempt: int = 0
    parse_retries: int = 0
    value: Any = None


# ---------------------------------------------------------------------- the client
class Client:
    """An LLM client (the `LLMClient` protocol): see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        store: CallStore | None = None,
        run_id: str | None = None,
        budget: Budget | None = None,
        settings: ClientSettings | None = None,
        prices: PriceTable | None = None,
    ):
        self._backend = backend
        self.backend = backend.backend
        self.model = backend.model
        self.spec = f"{self.backend}:{self.model}"
        self.store = store
        self.run_id = run_id
        self.budget = budget
        self.settings = settings or ClientSettings()
        self.prices = prices or PriceTable.load()
        self.limiter = shared_limiter(self.backend, self.model, self.settings.rpm, self.settings.tpm)
        self._sem = LoopSemaphore(self.settings.concurrency)
        self._same_request = LoopKeyLocks()
        self.breaker = CircuitBreaker(self.spec, getattr(backend, "endpoint", None), self.settings.max_failures,
                                      self.settings.rate_limit_patience_s)
        self._lock = threading.Lock()
        self.ledger: list[CallRow] = []  # this client's rows, kept in memory when there is no store
        self.spent_usd = 0.0
        self.n_requests = 0  # attempts that were sent
        self._price_warned = False
        self._load_capabilities()

    # ------------------------------------------------------------------ properties
    @property
    def supports_logprobs(self) -> bool:
        return self._backend.supports_logprobs

    @property
    def supports_candidate_probs(self) -> bool:
        return self._backend.supports_candidate_probs

    def __repr__(self) -> str:
        return f"Client({self.spec!r})"

    # ------------------------------------------------------------------ capabilities
    def _capability_store(self):
        """The store's capability table and this backend's key, when both exist."""
        key = getattr(self._backend, "capability_key", None)
        if key is None or not hasattr(self.store, "endpoint_capabilities"):
            return None, None
        return self.store, key()

    def _load_capabilities(self) -> None:
        store, key = self._capability_store()
        if store is not None:
            record = store.endpoint_capabilities(*key)
            if record is not None:
                self._backend.apply_capabilities(record)

    def _remember_capabilities(self) -> None:
        store, key = self._capability_store()
        if store is not None:
            store.remember_capabilities(*key, self._backend.capabilities_record())

    # ------------------------------------------------------------------ ledger
    def _record(self, state: _CallState | None, key: str, purpose: str, status: str, **kw) -> CallRow:
        row = CallRow(
            backend=self.backend, model=self.model, prompt_hash=key, status=status, purpose=purpose,
            run_id=self.run_id, attempt=state.attempt if state is not None else 0,
            cached=(status == CallStatus.CACHED), **kw,
        )
        if self.store is not None:
            self.store.record(row)
        else:
            with self._lock:
                self.ledger.append(row)
        return row

    def _cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
              written_tokens: int = 0) -> tuple[float, str | None]:
        cost, note = self.prices.cost(self.backend, self.model, input_tokens, output_tokens,
                                      cached_tokens, written_tokens)
        if note and not self._price_warned:
            self._price_warned = True
            log.warning(note)
        return cost, note

    def _spend(self, cost: float) -> None:
        with self._lock:
            self.spent_usd += cost
        if self.budget is not None:
            self.budget.add(cost)

    # ------------------------------------------------------------------ chat
    async def chat(
        self, request: ChatRequest, parse: Callable[[ChatResponse], T] | None = None
    ) -> T | ChatResponse:
        """Send `request`; with `parse`, return its result, asking again on UnparseableResponse.

        Raises LLMCallFailed when no usable answer came, BudgetExceeded when the budget is spent.
        """
        key = cache_key(self.backend, self.model, request)
        if self.store is None or not self.settings.use_cache:
            return await self._chat(key, request, parse)
        # the same request already on its way (two candidates that wrote the same explanation):
        # wait for it and take its answer from the cache instead of paying for it again
        async with self._same_request.hold(key):
            return await self._chat(key, request, parse)

    async def _chat(self, key: str, request: ChatRequest, parse) -> Any:
        if self.store is not None and self.settings.use_cache:
            hit = self.store.get_cached(key)
            if hit is not None:
                resp = ChatResponse.from_dict(hit, cached=True)
                try:
                    value = self._check(request, resp, parse)
                except UnparseableResponse:
                    value = _MISS  # the parse function changed: ask the model again
                if value is not _MISS:
                    self._record(None, key, request.purpose, CallStatus.CACHED, latency_s=0.0)
                    return value
        state = _CallState(key=key, request=request, max_tokens=request.max_tokens)
        resp = await self._with_retries(state, parse)
        if self.store is not None:
            self.store.put_cached(key, self.backend, self.model, resp.to_dict())
        return state.value if parse is not None else resp

    def _check(self, request: ChatRequest, resp: ChatResponse, parse) -> Any:
        """The parsed value of a usable answer; UnparseableResponse otherwise."""
        if resp.truncated and not (request.accept_truncated and parse is not None):
            raise UnparseableResponse(
                f"answer cut at max_tokens (finish_reason {resp.finish_reason})"
            )
        if parse is not None:
            return parse(resp)
        if request.json_schema is not None:
            resp.json()
        return resp

    async def _with_retries(self, state: _CallState, parse) -> ChatResponse:
        s = self.settings
        limits = {
            "transport": s.transport_attempts,
            "rate_limit": s.rate_limit_attempts,
            "server": s.server_attempts,
            "parse": s.max_parse_retries + 1,
            "rejected": s.rejected_attempts,
        }

        def stop(retry_state) -> bool:
            f: Failure = retry_state.outcome.exception().failure
            return state.counts[f.kind] >= limits[f.kind]

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, _Retry)),
            stop=stop,
            wait=_Wait(s, state.counts),
            sleep=asyncio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(state, parse)
        except _Retry as last:
            f = last.failure
            n = state.counts[f.kind]
            raise LLMCallFailed(
                f"{self.spec}: no usable answer after {state.attempt} attempt(s) "
                f"({n} {f.kind.replace('_', ' ')} failure(s)); last: {f.message}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, state: _CallState, parse) -> ChatResponse:
        """One attempt: wait for the limits and a slot, check the budget, send, judge the answer."""
        self.breaker.check()
        est = estimate_tokens(state.request.messages, state.max_tokens)
        await self.limiter.acquire(est)
        async with self._sem.get():
            self.breaker.check()  # tripped while this call waited for a slot
            # checked once a slot is free: a call still waiting for one has not started
            if self.budget is not None:
                try:
                    self.budget.check()
                except BudgetExceeded as err:
                    self.limiter.settle(est, 0)
                    self._record(state, state.key, state.request.purpose, CallStatus.BUDGET, error=str(err))
                    raise
            t0 = time.monotonic()
            resp = await self._send(state, t0)
        latency = time.monotonic() - t0
        self.limiter.settle(est, resp.input_tokens + resp.output_tokens)
        return self._answer(state, resp, latency, parse)

    async def _send(self, state: _CallState, t0: float) -> ChatResponse:
        """The backend's one attempt; a failure is recorded and raised as what the retry loop
        makes of it (_Retry, BackendBroken, LLMCallFailed, or the error itself)."""
        state.attempt += 1
        timeout = self.settings.timeout_s if self._backend.uses_timeout else 0
        try:
            with self._lock:
                self.n_requests += 1
            return await self._backend.send(state.request, max_tokens=state.max_tokens, timeout=timeout,
                                            retry_index=state.parse_retries)
        except RequestRejected as exc:  # before LLMCallFailed, its base: a refusal may be sent again
            raise self._failed(state, exc, time.monotonic() - t0, timeout) from None
        except (BudgetExceeded, LLMCallFailed):
            raise
        except asyncio.CancelledError:  # the request may have reached the server: keep a row
            self._record(state, state.key, state.request.purpose, CallStatus.ERROR,
                         latency_s=time.monotonic() - t0, error="cancelled")
            raise
        except Exception as exc:
            raise self._failed(state, exc, time.monotonic() - t0, timeout) from None

    def _failed(self, state: _CallState, exc: Exception, latency: float, timeout: float) -> BaseException:
        """Record a failed attempt; the exception that says what happens next."""
        f = classify(exc, timeout)
        if f is None:  # not an API failure: record it and let it surface
            self._record(state, state.key, state.request.purpose, CallStatus.ERROR, latency_s=latency,
                         error=f"{type(exc).__name__}: {exc}"[:2000])
            return exc
        self._record(state, state.key, state.request.purpose, CallStatus.ERROR, latency_s=latency, error=f.message[:2000])
        broken = self.breaker.failed(f.kind, state.request.purpose, f.message)
        if broken is not None:
            return broken
        if f.kind == "not_found":
            return ModelNotFound(f"{self.spec}: {f.message}")
        if f.kind == "fatal":
            return LLMCallFailed(f"{self.spec}: {f.message}")
        if f.kind == "rejected":
            if not exc.changed:
                return RequestRejected(f"{self.spec}: {f.message}", exc.feature, False)
            self._remember_capabilities()
        if f.kind == "rate_limit" and f.retry_after:
            self.limiter.pause(min(f.retry_after, self.settings.max_retry_after_s))
        state.counts[f.kind] += 1
        return _Retry(f)

    def _answer(self, state: _CallState, resp: ChatResponse, latency: float, parse) -> ChatResponse:
        """Bill an answer and judge it: recorded `ok`, or `parse_error` and asked again."""
        cost, note = self._cost(resp.input_tokens, resp.output_tokens, resp.cached_input_tokens,
                                resp.cache_write_tokens)
        self._spend(cost)
        resp.cost_usd, resp.latency_s, resp.attempts = cost, latency, state.attempt
        billed = dict(input_tokens=resp.input_tokens, output_tokens=resp.output_tokens, cost_usd=cost,
                      latency_s=latency, cached_input_tokens=resp.cached_input_tokens,
                      cache_write_tokens=resp.cache_write_tokens)
        purpose = state.request.purpose
        try:
            value = self._check(state.request, resp, parse)
        except UnparseableResponse as err:
            msg = str(err) or "unparseable answer"
            self._record(state, state.key, purpose, CallStatus.PARSE_ERROR, error=msg[:2000], **billed)
            if resp.truncated and self._backend.grow_on_truncation:
                state.max_tokens = min(max(state.max_tokens * 2, state.max_tokens + 1), self.settings.max_tokens_cap)
            state.parse_retries += 1
            state.counts["parse"] += 1
            broken = self.breaker.failed("parse", purpose, msg)
            if broken is not None:
                raise broken from None
            raise _Retry(Failure("parse", msg)) from None
        except Exception as err:  # the caller's parse function broke: the answer was still paid for
            self._record(state, state.key, purpose, CallStatus.PARSE_ERROR,
                         error=f"parse function raised {type(err).__name__}: {err}"[:2000], **billed)
            raise
        self._record(state, state.key, purpose, CallStatus.OK, error=note, **billed)
        self.breaker.succeeded(purpose)
        state.value = value
        return resp

    # ------------------------------------------------------------------ local models
    async def candidate_probs(
        self,
        text: str,
        positions: Sequence[int],
        candidates: Sequence[str],
        *,
        messages: Sequence[dict] | None = None,
        normalize: bool = True,
        purpose: str = "simulate",
    ):
        """Probabilities of `candidates` at each character offset of `text`, from one forward pass.

        Returns a float array of shape (len(positions), len(candidates)): row i is the
        distribution of the token that starts at `text[positions[i]]`, given everything before
        it (the chat-templated `messages` first, when given, then `text` as the assistant's
        answer so far). Rows sum to 1 over the candidates when `normalize`. Every candidate
        must be one token of the model's tokenizer (for SmolLM2, "0".."9" are; "10" is not).
        Local backends only (`supports_candidate_probs`); one ledger row per call, cost 0.
        """
        if not self._backend.supports_candidate_probs:
            raise NotImplementedError(f"{self.spec} cannot score candidate tokens; use chat with top_logprobs")
        key = hashlib.sha256(
            json.dumps([text, list(positions), list(candidates), list(messages or [])], sort_keys=True).encode()
        ).hexdigest()
        if self.budget is not None:
            self.budget.check()  # local calls cost 0, but a stopped run starts nothing new
        t0 = time.monotonic()
        async with self._sem.get():
            probs, n_tokens = await self._backend.candidate_probs(
                text, positions, candidates, messages=messages, normalize=normalize
            )
        self._record(_CallState(key, ChatRequest(messages=()), 0, attempt=1), key, purpose, CallStatus.OK,
                     input_tokens=n_tokens, output_tokens=0, cost_usd=0.0,
                     latency_s=time.monotonic() - t0)
        return probs

    async def load(self) -> None:
        """Load a local model now (it is otherwise loaded on the first call)."""
        if hasattr(self._backend, "load"):
            await self._backend.load()

    # ------------------------------------------------------------------ closing
    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    async def aclose(self) -> None:
        """Close this loop's HTTP client and write buffered ledger rows."""
        await self._backend.aclose()
        self.flush()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


_MISS = object()


def make_client(
    spec: str,
    *,
    store: CallStore | None = None,
    run_id: str | None = None,
    budget: Budget | None = None,
    settings: ClientSettings | None = None,
    use_cache: bool | None = None,
    concurrency: int | None = None,
    prices: PriceTable | None = None,
    device: str = "auto",
    **setting_overrides,
) -> Client:
    """A client for BACKEND spec `openai:MODEL`, `anthropic:MODEL` or `local:MODEL`.

    Raises (FeaturescribeError, before any work) MissingAPIKey when the backend's key is not
    set, NotAnLLMBackend for `baseline:...`, `lexical` or an unknown backend.
    `setting_overrides` are ClientSettings fields (timeout_s=..., rpm=..., ...).
    """
    if settings is None:
        settings = ClientSettings.from_env(parse_backend_spec(spec)[0], use_cache=use_cache,
                                           concurrency=concurrency, **setting_overrides)
    else:
        over = {k: v for k, v in dict(use_cache=use_cache, concurrency=concurrency, **setting_overrides).items()
                if v is not None}
        settings = replace(settings, **over)
    backend = make_backend(spec, BackendOptions(timeout_s=settings.timeout_s, device=device,
                                                pool_size=settings.concurrency, http=settings.http,
                                                structured=settings.structured))
    return Client(backend, store=store, run_id=run_id, budget=budget, settings=settings, prices=prices)
