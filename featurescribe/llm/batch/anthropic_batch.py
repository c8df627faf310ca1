"""Anthropic Message Batches: Messages requests sent in one call, results streamed as JSONL.

Limits (the API reference and the batch-processing guide, checked 2026-11): 100,000 requests or
256 MB per batch, whichever comes first; `custom_id` matches `^[a-zA-Z0-9_-]{1,64}$`. Each result
line is `{"custom_id", "result": {"type": "succeeded" | "errored" | "expired" | "canceled"}}`; a
batch that expires keeps the results it finished.
"""

from __future__ import annotations

import json
from typing import Iterator

from featurescribe.llm.batch.base import (CANCELED, ERRORED, EXPIRED, SUCCEEDED, BatchItem,
                                          BatchState, ItemResult, read_lines)

MAX_REQUESTS = 100_000
MAX_BYTES = 256 * 1024 * 1024
_KINDS = {"succeeded": SUCCEEDED, "errored": ERRORED, "expired": EXPIRED, "canceled": CANCELED}


class AnthropicBatchProvider:
    name = "anthropic"
    max_requests = MAX_REQUESTS
    max_bytes = MAX_BYTES

    def __init__(self, sdk=None):
        if sdk is None:
            from anthropic import Anthropic

            sdk = Anthropic(max_retries=5)
        self.sdk = sdk

    @staticmethod
    def item_bytes(item: BatchItem) -> int:
        # the JSON of {"custom_id", "params"} plus the list's comma
        return len(json.dumps({"custom_id": item.custom_id, "params": item.params},
                              separators=(",", ":")).encode()) + 1

    def submit(self, items: list[BatchItem], metadata: dict[str, str]) -> tuple[str, str | None]:
        b = self.sdk.messages.batches.create(
            requests=[{"custom_id": i.custom_id, "params": i.params} for i in items]
        )
        return b.id, None

    def poll(self, batch_id: str) -> BatchState:
        b = self.sdk.messages.batches.retrieve(batch_id)
        rc = b.request_counts
        counts = {"processing": rc.processing, "succeeded": rc.succeeded, "errored": rc.errored,
                  "canceled": rc.canceled, "expired": rc.expired}
        total = sum(counts.values())
        return BatchState(provider_status=b.processing_status, ended=b.processing_status == "ended",
                          total=total, done=total - rc.processing, counts=counts,
                          extra={"results_url": b.results_url})

    def results(self, batch_id: str, state: BatchState) -> Iterator[ItemResult]:
        # read line by line, not through the SDK's decoder, which stops at the first bad line
        with self.sdk.messages.batches.with_streaming_response.results(batch_id) as resp:
            yield from read_lines(resp.iter_lines(), _result)

    def cancel(self, batch_id: str) -> None:
        self.sdk.messages.batches.cancel(batch_id)


def _result(line: dict) -> ItemResult:
    cid, r = line["custom_id"], line["result"]
    kind = _KINDS.get(r.get("type"), ERRORED)
    if kind == SUCCEEDED:
        if not isinstance(r.get("message"), dict):
            raise TypeError("a succeeded result without a message")
        return ItemResult(cid, SUCCEEDED, body=r["message"])
    if kind == ERRORED:
        err = (r.get("error") or {}).get("error") or {}
        msg = f"{err.get('type', 'error')}: {err.get('message', '')}" if err else "errored"
        return ItemResult(cid, ERRORED, error=msg)
    return ItemResult(cid, kind, error=kind)


def chat_response(body: dict, item: BatchItem):
    """A Messages answer as the `ChatResponse` the Anthropic backend would have made."""
    from featurescribe.llm.backends.anthropic_backend import TOOL_NAME
    from featurescribe.llm.base import ChatResponse

    text = None
    content = body.get("content") or []
    if item.structured:
        for block in content:
            if block.get("type") == "tool_use" and block.get("name") == TOOL_NAME:
                value = block.get("input")
                if item.wrapped and isinstance(value, dict) and "value" in value:
                    value = value["value"]
                text = json.dumps(value)
                break
    if text is None:
        text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
    usage = body.get("usage") or {}
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    return ChatResponse(
        text=text,  # Anthropic's input_tokens leaves out the cached ones: the total is their sum
        input_tokens=int(usage.get("input_tokens") or 0) + read + written,
        output_tokens=int(usage.get("output_tokens") or 0),
        cached_input_tokens=read,
        cache_write_tokens=written,
        finish_reason=body.get("stop_reason"),
        raw={"id": body.get("id"), "model": body.get("model")},
    )


AnthropicBatchProvider.chat_response = staticmethod(chat_response)
