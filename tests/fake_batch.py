"""Batch endpoints for the fake LLM server: OpenAI Files + Batches and Anthropic Message Batches.

`FakeBatchServer` is a `tests.fake_llm.FakeLLMServer` (same chat endpoints, responder, faults and
request log) that also answers:

- OpenAI   `POST /v1/files` (multipart upload, purpose "batch"), `GET /v1/files/{id}`,
  `GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`,
  `POST /v1/batches/{id}/cancel`;
- Anthropic `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`,
  `POST /v1/messages/batches/{id}/cancel`, `GET /v1/messages/batches/{id}/results`.

A batch is worked off when it is retrieved: it answers `in_progress` to its first `batch_polls`
retrieves (default 1), then runs every request through the responder and ends. `server.hold =
True` keeps every batch in progress until it is set back to False (a restart test submits, stops,
and collects later). `server.down_status = 503` makes every batch endpoint answer that status
(with the error body `server.down_body`, when set), and
`server.api_key = "k"` answers 401 to another key, as for chat. Each request a batch runs is appended to `server.batch_items` (a
`RecordedRequest` with `api` 'openai-batch' or 'anthropic-batch'); the HTTP calls to the batch
endpoints go to `server.requests` as usual with `api` 'batch' (and never count as `billed`).

What happens to the next batch created is planned with `server.plan(...)` (first in, first out):

    server.plan(expire_after=2)     # runs 2 requests, the rest expire (partial output kept)
    server.plan(errors=[0, 3])      # requests 0 and 3 (in submission order) come back errored
    server.plan(cancel=True)        # the batch is cancelled before it runs anything
    server.plan(fail=True)          # OpenAI: validation fails ('failed'); Anthropic: all errored
    server.plan(garble=[1], extra_lines=['{"custom_id": "x"}'])  # request 1's result line cut
                                    # short (not JSON); the lines given added to the results

Output shapes follow the providers: an OpenAI output file holds one line per succeeded request
`{"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion>},
"error": null}`; the error file holds errored requests (`response.status_code` 4xx/5xx with an
error body) and expired / cancelled ones (`"response": null, "error": {"code": "batch_expired" |
"batch_cancelled", ...}`). Anthropic results are JSONL `{"custom_id", "result": {"type":
"succeeded", "message": ...} | {"type": "errored", "error": {...}} | {"type": "expired"} |
{"type": "canceled"}}`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP

from tests.fake_llm import (
    FakeLLMServer,
    RecordedRequest,
    Reply,
    _anthropic_body,
    _Handler,
    _input_tokens,
    _openai_body,
    _parse_anthropic,
    _parse_openai,
    count_tokens,
)

__all__ = ["FakeBatchServer", "BatchPlan"]


@dataclass
class BatchPlan:
    expire_after: int | None = None  # run this many requests, the rest expire
    errors: tuple[int, ...] = ()  # indices (submission order) that come back errored
    cancel: bool = False  # cancelled before anything runs
    fail: bool = False  # the whole batch fails
    garble: tuple[int, ...] = ()  # indices whose result line is cut short (not JSON)
    extra_lines: tuple[str, ...] = ()  # raw lines added to the results (OpenAI: the output file)


@dataclass
class _Batch:
    id: str
    api: str  # 'openai' | 'anthropic'
    requests: list[dict]  # openai: {'custom_id', 'method', 'url', 'body'}; anthropic: {'custom_id', 'params'}
    plan: BatchPlan
    created_at: float
    input_file_id: str | None = None
    endpoint: str | None = None
    polls: int = 0
    state: str = "in_progress"  # in_progress | cancelling | ended
    outcome: str | None = None  # openai final status: completed | expired | cancelled | failed
    results: list[dict] = field(default_factory=list)  # per request: {'custom_id', 'kind', ...}
    output_file_id: str | None = None
    error_file_id: str | None = None
    ended_at: float | None = None
    metadata: dict | None = None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


class FakeBatchServer(FakeLLMServer):
    """See the module docstring."""

    def __init__(self, *args, batch_polls: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_polls = batch_polls
        self.hold = False
        self.down_status: int | None = None  # set (e.g. 503): every batch endpoint answers it
        self.down_body: dict | None = None  # the body it answers with (default: a 'service unavailable' error)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, _Batch] = {}
        self.plans: deque[BatchPlan] = deque()
        self.batch_items: list[RecordedRequest] = []
        self._batch_lock = threading.RLock()

    # ------------------------------------------------------------------ lifecycle
    def _handler_class(self) -> type[_Handler]:
        return _BatchHandler

    # ------------------------------------------------------------------ controls and views
    def plan(self, *, expire_after: int | None = None, errors=(), cancel: bool = False,
             fail: bool = False, garble=(), extra_lines=()) -> None:
        with self._batch_lock:
            self.plans.append(BatchPlan(expire_after, tuple(errors), cancel, fail, tuple(garble),
                                        tuple(extra_lines)))

    def created_batches(self, api: str | None = None) -> list[_Batch]:
        with self._batch_lock:
            return [b for b in self.batches.values() if api is None or b.api == api]

    def batch_item_count(self, api: str | None = None) -> int:
        return sum(1 for r in self.batch_items if api is None or r.api == f"{api}-batch")

    # ------------------------------------------------------------------ files
    def _add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        fid = "file-" + uuid.uuid4().hex[:24]
        obj = {
            "id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed",
        }
        self.files[fid] = {"meta": obj, "content": content}
        return obj

    # ------------------------------------------------------------------ batch life
    def _create(self, api: str, requests: list[dict], **extra) -> _Batch:
        with self._batch_lock:
            plan = self.plans.popleft() if self.plans else BatchPlan()
            prefix = "batch_" if api == "openai" else "msgbatch_"
            b = _Batch(id=prefix + uuid.uuid4().hex[:24], api=api, requests=requests, plan=plan,
                       created_at=time.time(), **extra)
            self.batches[b.id] = b
            if plan.cancel:
                self._cancel(b)
            return b

    def _cancel(self, b: _Batch) -> None:
        if b.state == "in_progress":
            b.state = "cancelling"

    def _advance(self, b: _Batch) -> None:
        """One retrieve: maybe work the batch off."""
        with self._batch_lock:
            if b.state == "ended":
                return
            b.polls += 1
            if b.state == "cancelling":
                self._finish(b, cancelled=True)
            elif not self.hold and b.polls > self.batch_polls:
                self._finish(b, cancelled=False)

    def _finish(self, b: _Batch, cancelled: bool) -> None:
        plan = b.plan
        results = []
        for i, req in enumerate(b.requests):
            cid = req["custom_id"]
            if cancelled:
                results.append({"custom_id": cid, "kind": "canceled"})
            elif plan.fail:
                results.append({"custom_id": cid, "kind": "errored", "status": 400,
                                "message": "batch failed validation"})
            elif plan.expire_after is not None and i >= plan.expire_after:
                results.append({"custom_id": cid, "kind": "expired"})
            elif i in plan.errors:
                results.append({"custom_id": cid, "kind": "errored", "status": 500,
                                "message": "The server had an error processing this request."})
            else:
                results.append({"custom_id": cid, "kind": "succeeded", "body": self._run_one(b, req)})
        b.results = results
        b.state = "ended"
        b.ended_at = time.time()
        if cancelled:
            b.outcome = "cancelled"
        elif plan.fail and b.api == "openai":
            b.outcome = "failed"
        elif plan.expire_after is not None and plan.expire_after < len(b.requests):
            b.outcome = "expired"
        else:
            b.outcome = "completed"
        if b.api == "openai" and b.outcome != "failed":
            self._write_openai_files(b)

    def _run_one(self, b: _Batch, req: dict) -> dict:
        """Run one request of a batch through the responder; the provider's answer body."""
        body = req["body"] if b.api == "openai" else req["params"]
        rec = RecordedRequest(api=f"{b.api}-batch", path="batch", headers={}, body=body,
                              started_at=time.monotonic())
        (_parse_openai if b.api == "openai" else _parse_anthropic)(rec)
        out = self.responder(rec)
        reply = out if isinstance(out, Reply) else Reply(text=str(out))
        rec.input_tokens = reply.input_tokens if reply.input_tokens is not None else _input_tokens(rec)
        rec.output_tokens = (
            reply.output_tokens if reply.output_tokens is not None else count_tokens(reply.text)
        )
        # batch requests read and write the provider's prompt cache as direct ones do
        rec.cache_read_tokens, rec.cache_write_tokens = self.prompt_cache(replace(rec, api=b.api))
        answer = _openai_body(rec, reply) if b.api == "openai" else _anthropic_body(rec, reply, False)
        rec.status = 200
        rec.response = answer
        rec.finished_at = time.monotonic()
        self.batch_items.append(rec)
        return answer

    def _write_openai_files(self, b: _Batch) -> None:
        out_lines, err_lines = [], []
        for r in b.results:
            line_id = "batch_req_" + uuid.uuid4().hex[:20]
            if r["kind"] == "succeeded":
                out_lines.append({"id": line_id, "custom_id": r["custom_id"], "response": {
                    "status_code": 200, "request_id": "req_" + uuid.uuid4().hex[:12], "body": r["body"]},
                    "error": None})
            elif r["kind"] == "errored":
                err_lines.append({"id": line_id, "custom_id": r["custom_id"], "response": {
                    "status_code": r["status"], "request_id": "req_" + uuid.uuid4().hex[:12],
                    "body": {"error": {"message": r["message"], "type": "server_error",
                                       "param": None, "code": None}}}, "error": None})
            else:
                code = "batch_expired" if r["kind"] == "expired" else "batch_cancelled"
                msg = ("This request could not be executed before the completion window expired."
                       if r["kind"] == "expired" else "This request was cancelled.")
                err_lines.append({"id": line_id, "custom_id": r["custom_id"], "response": None,
                                  "error": {"code": code, "message": msg}})

        def dump(lines):
            return "".join(json.dumps(x) + "\n" for x in lines).encode()

        if out_lines or b.plan.extra_lines:
            content = _spoil(b, dump(out_lines), [r["custom_id"] for r in b.results if r["kind"] == "succeeded"])
            b.output_file_id = self._add_file(content, f"{b.id}_output.jsonl", "batch_output")["id"]
        if err_lines:
            b.error_file_id = self._add_file(dump(err_lines), f"{b.id}_error.jsonl", "batch_output")["id"]

    # ------------------------------------------------------------------ wire objects
    def openai_object(self, b: _Batch) -> dict:
        n = len(b.requests)
        done = sum(1 for r in b.results if r["kind"] == "succeeded")
        failed = len(b.results) - done
        if b.state == "in_progress" and b.polls > 0:
            done = min(n, n // 2)  # halfway, as seen while it runs
        status = {"in_progress": "in_progress", "cancelling": "cancelling"}.get(b.state, b.outcome)
        ts = int(b.created_at)
        end = int(b.ended_at) if b.ended_at else None
        return {
            "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": (
                {"object": "list", "data": [{"code": "invalid_request", "message": "batch failed validation",
                                             "line": 1, "param": None}]} if b.outcome == "failed" else None),
            "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": ts, "in_progress_at": ts, "expires_at": ts + 86400,
            "finalizing_at": end, "completed_at": end if b.outcome == "completed" else None,
            "failed_at": end if b.outcome == "failed" else None,
            "expired_at": end if b.outcome == "expired" else None,
            "cancelling_at": end if b.outcome == "cancelled" else None,
            "cancelled_at": end if b.outcome == "cancelled" else None,
            "request_counts": {"total": n, "completed": done, "failed": failed if b.state == "ended" else 0},
            "metadata": b.metadata,
        }

    def anthropic_object(self, b: _Batch) -> dict:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if b.state == "ended":
            for r in b.results:
                counts[r["kind"]] += 1
        else:
            counts["processing"] = len(b.requests)
        return {
            "id": b.id, "type": "message_batch",
            "processing_status": {"in_progress": "in_progress", "cancelling": "canceling"}.get(b.state, "ended"),
            "request_counts": counts,
            "ended_at": _iso(b.ended_at) if b.ended_at else None,
            "created_at": _iso(b.created_at),
            "expires_at": _iso(b.created_at + 86400),
            "archived_at": None,
            "cancel_initiated_at": _iso(b.ended_at) if b.outcome == "cancelled" else None,
            "results_url": f"{self.url}/v1/messages/batches/{b.id}/results" if b.state == "ended" else None,
        }

    def anthropic_results(self, b: _Batch) -> bytes:
        lines = []
        for r in b.results:
            if r["kind"] == "succeeded":
                result = {"type": "succeeded", "message": r["body"]}
            elif r["kind"] == "errored":
                result = {"type": "errored", "error": {"type": "error", "error": {
                    "type": "api_error", "message": r["message"]}, "request_id": None}}
            else:
                result = {"type": r["kind"]}
            lines.append(json.dumps({"custom_id": r["custom_id"], "result": result}) + "\n")
        return _spoil(b, "".join(lines).encode(), [r["custom_id"] for r in b.results])


def _spoil(b: _Batch, content: bytes, ids: list[str]) -> bytes:
    """Result lines as the plan spoils them: the lines of `garble`'s requests cut short, and
    `extra_lines` added."""
    cut = {b.requests[i]["custom_id"] for i in b.plan.garble}
    lines = [line[:len(line) // 2] + "\n" if cid in cut else line
             for cid, line in zip(ids, content.decode().splitlines(keepends=True))]
    return "".join(lines + [x + "\n" for x in b.plan.extra_lines]).encode()


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename, bytes)} of a multipart/form-data body."""
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + raw
    )
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class _BatchHandler(_Handler):
    """The chat endpoints of `_Handler`, and the batch endpoints of `self.server.fake`."""

    def _send_bytes(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _route(self, method: str) -> bool:
        fake = self.server.fake
        path = self.path.split("?")[0].rstrip("/")
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "v1" or not (
            parts[1] in ("files", "batches") or parts[1:3] == ["messages", "batches"]
        ):
            return False
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        rec = RecordedRequest(api="batch", path=path,
                              headers={k.lower(): v for k, v in self.headers.items()}, body={},
                              started_at=time.monotonic())
        fake._enter(rec)
        try:
            key = rec.headers.get("x-api-key") or rec.headers.get("authorization", "").removeprefix("Bearer ")
            if fake.down_status is not None:
                rec.status = fake.down_status
                self._send(fake.down_status, fake.down_body or {"error": {"message": "service unavailable",
                                                                          "type": "api_error"}})
            elif not key or (fake.api_key is not None and key != fake.api_key):
                rec.status = 401
                self._send(401, {"error": {"message": "Incorrect API key provided" if key else "missing API key",
                                           "type": "authentication_error"}})
            else:
                rec.status = self._dispatch(method, parts[1:], raw, rec)
        finally:
            rec.finished_at = time.monotonic()
            fake._leave()
        return True

    def _not_found(self, what: str) -> int:
        self._send(404, {"error": {"message": f"no such {what}", "type": "not_found_error"}})
        return 404

    def _dispatch(self, method: str, parts: list[str], raw: bytes, rec: RecordedRequest) -> int:
        """Answer a batch endpoint; the HTTP status sent."""
        if parts[0] == "files":
            return self._files(method, parts, raw, rec)
        if parts[0] == "batches":
            return self._openai_batches(method, parts, raw, rec)
        # Anthropic: messages/batches[/{id}[/cancel|/results]]
        return self._anthropic_batches(method, parts[2:], raw, rec)

    def _files(self, method: str, parts: list[str], raw: bytes, rec: RecordedRequest) -> int:
        s = self.server.fake
        if method == "POST" and len(parts) == 1:
            fields = _parse_multipart(self.headers.get("Content-Type", ""), raw)
            filename, content = fields.get("file", (None, b""))
            purpose = (fields.get("purpose", (None, b""))[1] or b"").decode()
            rec.body = {"purpose": purpose, "filename": filename, "bytes": len(content)}
            with s._batch_lock:
                obj = s._add_file(content, filename or "upload.jsonl", purpose)
            self._send(200, obj)
            return 200
        f = s.files.get(parts[1]) if len(parts) > 1 else None
        if f is None:
            return self._not_found("file")
        if len(parts) == 3 and parts[2] == "content":
            self._send_bytes(200, f["content"], "application/octet-stream")
        else:
            self._send(200, f["meta"])
        return 200

    def _openai_batches(self, method: str, parts: list[str], raw: bytes, rec: RecordedRequest) -> int:
        s = self.server.fake
        if method == "POST" and len(parts) == 1:
            body = json.loads(raw or b"{}")
            rec.body = body
            f = s.files.get(body.get("input_file_id", ""))
            if f is None:
                return self._not_found("file")
            reqs = [json.loads(line) for line in f["content"].decode().splitlines() if line.strip()]
            b = s._create("openai", reqs, input_file_id=body["input_file_id"],
                          endpoint=body.get("endpoint"), metadata=body.get("metadata"))
            self._send(200, s.openai_object(b))
            return 200
        b = s.batches.get(parts[1]) if len(parts) > 1 else None
        if b is None or b.api != "openai":
            return self._not_found("batch")
        if method == "POST" and len(parts) == 3 and parts[2] == "cancel":
            with s._batch_lock:
                s._cancel(b)
        else:
            s._advance(b)
        self._send(200, s.openai_object(b))
        return 200

    def _anthropic_batches(self, method: str, parts: list[str], raw: bytes, rec: RecordedRequest) -> int:
        """`parts`: what follows messages/batches in the path."""
        s = self.server.fake
        if method == "POST" and not parts:
            body = json.loads(raw or b"{}")
            rec.body = {"n_requests": len(body.get("requests", []))}
            b = s._create("anthropic", list(body.get("requests", [])))
            self._send(200, s.anthropic_object(b))
            return 200
        b = s.batches.get(parts[0]) if parts else None
        if b is None or b.api != "anthropic":
            return self._not_found("message batch")
        if method == "POST" and parts[1:] == ["cancel"]:
            with s._batch_lock:
                s._cancel(b)
            self._send(200, s.anthropic_object(b))
        elif parts[1:] == ["results"]:
            if b.state != "ended":
                self._send(400, {"type": "error", "error": {
                    "type": "invalid_request_error", "message": "batch has not ended"}})
                return 400
            self._send_bytes(200, s.anthropic_results(b), "application/binary")
        else:
            s._advance(b)
            self._send(200, s.anthropic_object(b))
        return 200

    def do_GET(self):
        if not self._route("GET"):
            super().do_GET()

    def do_POST(self):
        if not self._route("POST"):
            super().do_POST()

