"""OpenAI Batch: a JSONL file of `/v1/chat/completions` requests uploaded with purpose "batch",
then a batch job over it (completion window 24h).

Limits (the SDK's `batches.create` documentation, checked 2026-11): 50,000 requests and 200 MB
per input file. Results: the output file holds one line per answered request
(`{"custom_id", "response": {"status_code", "body"}, "error"}`); the error file holds the
requests that failed (`response.status_code` >= 400) and, for an expired or cancelled batch, the
requests never run (`"error": {"code": "batch_expired" | "batch_cancelled"}`). An expired batch
keeps the output of what it finished.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

from featurescribe.llm.batch.base import (CANCELED, ERRORED, EXPIRED, SUCCEEDED, BatchItem,
                                          BatchState, ItemResult, read_lines)

ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
_ENDED = ("completed", "expired", "cancelled", "failed")


def _line(item: BatchItem) -> bytes:
    return (json.dumps({"custom_id": item.custom_id, "method": "POST", "url": ENDPOINT,
                        "body": item.params}, separators=(",", ":")) + "\n").encode()


class OpenAIBatchProvider:
    name = "openai"
    max_requests = MAX_REQUESTS
    max_bytes = MAX_BYTES

    def __init__(self, sdk=None):
        if sdk is None:
            import os

            from openai import OpenAI

            from featurescribe.llm.backends.openai_backend import is_openai_proper, openai_base_url

            base = openai_base_url()
            key = os.environ.get("OPENAI_API_KEY") or (None if is_openai_proper(base) else "not-needed")
            sdk = OpenAI(base_url=base, api_key=key, max_retries=5)
        self.sdk = sdk

    @staticmethod
    def item_bytes(item: BatchItem) -> int:
        return len(_line(item))

    def submit(self, items: list[BatchItem], metadata: dict[str, str]) -> tuple[str, str | None]:
        data = b"".join(_line(i) for i in items)
        f = self.sdk.files.create(file=("featurescribe-batch.jsonl", io.BytesIO(data)), purpose="batch")
        b = self.sdk.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h",
                                    metadata=metadata or None)
        return b.id, f.id

    def poll(self, batch_id: str) -> BatchState:
        b = self.sdk.batches.retrieve(batch_id)
        rc = b.request_counts
        total = rc.total if rc else 0
        done = (rc.completed + rc.failed) if rc else 0
        return BatchState(
            provider_status=b.status, ended=b.status in _ENDED, total=total, done=done,
            counts={"completed": rc.completed, "failed": rc.failed, "total": rc.total} if rc else {},
            extra={"output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
                   "errors": [e.message for e in (b.errors.data or [])] if b.errors else None},
        )

    def results(self, batch_id: str, state: BatchState) -> Iterator[ItemResult]:
        for key in ("output_file_id", "error_file_id"):
            file_id = state.extra.get(key)
            if not file_id:
                continue
            with self.sdk.files.with_streaming_response.content(file_id) as resp:  # files reach 200 MB
                yield from read_lines(resp.iter_lines(), _result)

    def cancel(self, batch_id: str) -> None:
        self.sdk.batches.cancel(batch_id)


def _result(d: dict) -> ItemResult:
    cid = d.get("custom_id", "")
    resp = d.get("response") or None
    err = d.get("error") or None
    if resp is not None and resp.get("status_code") == 200 and not err:
        return ItemResult(cid, SUCCEEDED, body=resp.get("body"))
    if err is not None:
        code = str(err.get("code") or "")
        kind = EXPIRED if "expired" in code else CANCELED if "cancel" in code else ERRORED
        return ItemResult(cid, kind, error=f"{code}: {err.get('message', '')}".strip(": "))
    body = (resp or {}).get("body") or {}
    msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
    return ItemResult(cid, ERRORED, error=f"HTTP {(resp or {}).get('status_code')}: {msg or body}")


def chat_response(body: dict, item: BatchItem):
    """A chat.completion body as the `ChatResponse` the OpenAI backend would have made."""
    from openai.types.chat import ChatCompletion

    from featurescribe.llm.base import ChatResponse, TokenLogprob

    r = ChatCompletion.model_validate(body)
    choice = r.choices[0] if r.choices else None
    text = (choice.message.content or "") if choice is not None else ""
    logprobs = None
    if choice is not None and choice.logprobs is not None and choice.logprobs.content:
        logprobs = [
            TokenLogprob(token=t.token, logprob=float(t.logprob),
                         top={a.token: float(a.logprob) for a in (t.top_logprobs or [])})
            for t in choice.logprobs.content
        ]
    usage = r.usage
    details = usage.prompt_tokens_details if usage else None
    return ChatResponse(
        text=text,
        input_tokens=int(usage.prompt_tokens or 0) if usage else 0,
        output_tokens=int(usage.completion_tokens or 0) if usage else 0,
        cached_input_tokens=int(details.cached_tokens or 0) if details else 0,
        logprobs=logprobs,
        finish_reason=choice.finish_reason if choice is not None else None,
        raw={"id": r.id, "model": r.model},
    )


OpenAIBatchProvider.chat_response = staticmethod(chat_response)
