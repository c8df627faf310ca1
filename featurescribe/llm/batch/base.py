"""What the batch runner needs from a provider, and the records it passes around.

A provider adapter (`openai_batch.py`, `anthropic_batch.py`) speaks one provider's batch API
through its official SDK (the synchronous client; batches are slow, and polling needs no
concurrency). It knows the provider's limits, submits one chunk of requests, reports progress,
and reads the results back as `ItemResult`s keyed by `custom_id`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from featurescribe.llm.base import LLMCallFailed

# What can come back for one request.
SUCCEEDED, ERRORED, EXPIRED, CANCELED, MISSING = "succeeded", "errored", "expired", "canceled", "missing"
UNREADABLE = "unreadable"  # a result line that is not JSON or not a result: it answers no request


class BatchPending(LLMCallFailed):
    """Raised by `BatchCollector.chat` for a request that a batch will answer.

    The collect pass of `label --batch` runs the pipeline only to learn which requests it would
    make, and never writes; code that catches `LLMCallFailed` per feature treats this one like
    any failed call, so one pending feature does not stop the others from being collected.
    """


@dataclass
class BatchItem:
    """One request in a batch: its custom_id (the response-cache key), the provider's request
    body, and what the ledger needs to know about it."""

    custom_id: str
    params: dict[str, Any]
    purpose: str = "chat"
    structured: bool = False  # the request asked for a JSON schema: the answer must be JSON
    wrapped: bool = False  # Anthropic: the schema was wrapped in {"value": ...}
    estimate: tuple[int, int] = (0, 0)  # worst-case (input, output) tokens, for --budget-usd


@dataclass
class ItemResult:
    custom_id: str
    kind: str  # succeeded | errored | expired | canceled | missing | unreadable
    body: dict[str, Any] | None = None  # the provider's answer (chat.completion / message)
    error: str | None = None


def read_lines(lines, parse) -> Iterator[ItemResult]:
    """`parse(dict)` of every JSON line; a line that is not a result becomes an UNREADABLE
    result, so one bad line neither hides the others nor keeps the batch from being collected
    (its request, if it had one, is missing and asked again)."""
    for line in lines:
        if not line.strip():
            continue
        try:
            yield parse(json.loads(line))
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            yield ItemResult("", UNREADABLE, error=f"{type(err).__name__}: {err}"[:200])


@dataclass
class BatchState:
    """A provider's view of one batch, as polled."""

    provider_status: str
    ended: bool
    total: int
    done: int  # requests finished so far (any outcome), as far as the provider tells
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. output_file_id, error_file_id


class BatchProvider(Protocol):
    name: str  # 'openai' | 'anthropic'
    max_requests: int  # requests per batch
    max_bytes: int  # bytes per batch (input file or request body)

    @staticmethod
    def item_bytes(item: BatchItem) -> int:
        """How many bytes the item adds to the batch (to stay under max_bytes)."""
        ...

    def submit(self, items: list[BatchItem], metadata: dict[str, str]) -> tuple[str, str | None]:
        """Create a batch; (batch_id, input_file_id or None)."""
        ...

    def poll(self, batch_id: str) -> BatchState:
        ...

    def results(self, batch_id: str, state: BatchState) -> Iterator[ItemResult]:
        """Every result the provider has for an ended batch (missing ones are the caller's)."""
        ...

    def cancel(self, batch_id: str) -> None:
        ...


def provider_class(backend: str):
    """The adapter class for a backend with a batch API (see llm/registry.py)."""
    from featurescribe.llm.registry import batch_provider_class

    return batch_provider_class(backend)
