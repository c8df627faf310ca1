"""The collect pass: an LLM client that records requests instead of sending them.

`BatchCollector` has the `chat(request, parse)` of `featurescribe.llm.Client` and stands in for
one. A request whose answer is in the response cache is answered from it (no ledger row: the
pass is a rehearsal); any other is handed to the `BatchSink` and `BatchPending` is raised. The
sink gathers the requests of every collector (deduplicated by cache key), sorts out those already
in an open batch, and hands the rest to the runner in chunks that fit the provider's limits, so a
pass over a million requests never holds more than one batch of them in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from featurescribe.llm.base import ChatRequest, ChatResponse, UnparseableResponse
from featurescribe.llm.batch.base import BatchItem, BatchPending, provider_class
from featurescribe.llm.client import cache_key
from featurescribe.llm.limits import estimate_tokens
from featurescribe.llm.registry import BACKENDS, make_backend
from featurescribe.store import batches as sql
from featurescribe.store.connection import session



def has_batch_api(backend: str | None) -> bool:
    """Whether a backend ('openai') has a provider batch API (llm/registry.py)."""
    return backend in BACKENDS.where(batch_provider=True)

_MISS = object()


def usable_cached(request: ChatRequest, hit: dict, parse) -> Any:
    """The value the client would return for a cached answer, or _MISS when it is not usable."""
    resp = ChatResponse.from_dict(hit, cached=True)
    if resp.truncated:
        return _MISS
    try:
        if parse is not None:
            return parse(resp)
        if request.json_schema is not None:
            resp.json()
    except UnparseableResponse:
        return _MISS
    return resp


class BatchCollector:
    """Stands in for `inner` (an openai/anthropic `Client`) during a collect pass."""

    def __init__(self, inner, sink: "BatchSink"):
        self.inner = inner
        self.sink = sink
        self.spec, self.backend, self.model = inner.spec, inner.backend, inner.model
        self._builder = make_backend(inner.spec)  # builds request bodies exactly as the backend does
        self.supports_candidate_probs = False

    @property
    def supports_logprobs(self) -> bool:
        return self.inner.supports_logprobs

    def __getattr__(self, name):  # store, run_id, budget, flush, ... of the real client
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"BatchCollector({self.spec!r})"

    def item(self, key: str, request: ChatRequest) -> BatchItem:
        built = self._builder.params(request, request.max_tokens)
        params, wrapped = built if isinstance(built, tuple) else (built, False)
        schema = json.dumps(request.json_schema) if request.json_schema is not None else ""
        estimate = (estimate_tokens(request.messages, 0) + len(schema) // 4, request.max_tokens)
        return BatchItem(custom_id=key, params=params, purpose=request.purpose,
                         structured=request.json_schema is not None, wrapped=wrapped, estimate=estimate)

    async def chat(self, request: ChatRequest, parse: Callable[[ChatResponse], Any] | None = None):
        key = cache_key(self.backend, self.model, request)
        store = self.inner.store
        hit = store.get_cached(key) if store is not None else None
        if hit is not None:
            value = usable_cached(request, hit, parse)
            if value is not _MISS:
                return value
            # cached but not usable (the parse function changed): ask again now, directly, so
            # the requests that depend on this answer can still go in the next batch
            return await self.inner.chat(request, parse)
        self.sink.add(self, key, request)
        raise BatchPending(f"{self.spec}: answered by a batch")


@dataclass
class _Buffer:
    items: list[BatchItem] = field(default_factory=list)
    nbytes: int = 0


class BatchSink:
    """Where collectors put the requests of one pass. See the module docstring.

    `submit(collector, items)` is the runner's: it creates one provider batch and records it, and
    returns how many of the items it submitted (0 when none, e.g. the budget is spent).
    Requests already tried in `max_attempts` batches (1 with retry='direct') are not batched again:
    they are kept in `direct` for the runner to send through the ordinary client.
    """

    def __init__(self, con, submit: Callable[["BatchCollector", list[BatchItem]], int], *,
                 retry: str = "batch", max_attempts: int = 3, check_every: int = 2000,
                 given_up: set[str] | None = None,
                 limits: Callable[[str], tuple[int, int]] | None = None):
        self.con = con
        self.limits = limits or (lambda backend: (provider_class(backend).max_requests,
                                                  provider_class(backend).max_bytes))
        self._submit = submit
        self.retry = retry
        self.max_attempts = max_attempts
        self.check_every = check_every
        self.given_up = given_up if given_up is not None else set()
        self._seen: set[bytes] = set()
        self._unchecked: list[tuple[BatchCollector, str, ChatRequest]] = []
        self._buffers: dict[str, _Buffer] = {}
        self._collectors: dict[str, BatchCollector] = {}
        self.direct: list[tuple[BatchCollector, str, ChatRequest]] = []
        self.n_requests = 0  # distinct uncached requests this pass
        self.n_waiting = 0  # ... already in an open batch
        self.n_submitted = 0  # ... submitted by this pass
        self.n_given_up = 0  # ... that failed in every way already (left to the final pass)

    def add(self, collector: BatchCollector, key: str, request: ChatRequest) -> None:
        k = bytes.fromhex(key) if len(key) == 64 else key.encode()
        if k in self._seen:
            return
        self._seen.add(k)
        self.n_requests += 1
        self._unchecked.append((collector, key, request))
        if len(self._unchecked) >= self.check_every:
            self._check()

    def _check(self) -> None:
        todo, self._unchecked = self._unchecked, []
        with session(self.con) as con:
            known = sql.classify_items(con, [key for _, key, _ in todo])
        limit = 1 if self.retry == "direct" else self.max_attempts
        for collector, key, request in todo:
            is_open, attempts = known.get(key, (False, 0))
            if is_open:
                self.n_waiting += 1
            elif key in self.given_up:
                self.n_given_up += 1
            elif attempts >= limit:
                self.direct.append((collector, key, request))
            else:
                self._buffer(collector, collector.item(key, request))

    def _buffer(self, collector: BatchCollector, item: BatchItem) -> None:
        cls = provider_class(collector.backend)
        max_requests, max_bytes = self.limits(collector.backend)
        buf = self._buffers.setdefault(collector.spec, _Buffer())
        self._collectors[collector.spec] = collector
        size = cls.item_bytes(item)
        if buf.items and (len(buf.items) + 1 > max_requests or buf.nbytes + size > max_bytes):
            self._flush(collector.spec)
            buf = self._buffers[collector.spec]
        buf.items.append(item)
        buf.nbytes += size

    def _flush(self, spec: str) -> None:
        buf = self._buffers.get(spec)
        if buf is None or not buf.items:
            return
        self._buffers[spec] = _Buffer()
        self.n_submitted += self._submit(self._collectors[spec], buf.items)

    def finish(self) -> None:
        """End of the pass: sort out the last requests and submit every partial batch."""
        self._check()
        for spec in list(self._buffers):
            self._flush(spec)

