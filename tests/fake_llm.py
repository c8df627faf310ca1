"""A fake LLM provider for tests: a real HTTP server on 127.0.0.1 in a background thread.

It speaks enough of two APIs for the real SDKs to talk to it:

- OpenAI   `POST /v1/chat/completions` (base URL `server.base_url_openai`, i.e. `.../v1`), with
  `logprobs`/`top_logprobs` when the request asks and the responder gives them, and
  `response_format` (json_schema / json_object) accepted;
- OpenAI   `POST /v1/embeddings`: deterministic bag-of-words vectors (`fake_embedding`), usage
  in the same fake tokens, faults as for chat requests;
- Anthropic `POST /v1/messages` (base URL `server.base_url_anthropic`), with `usage`,
  `stop_reason`, tools (`tool_choice` forcing a tool answers with a `tool_use` block) and
  `output_config.format` (answers JSON text).

Usage:

    server = FakeLLMServer(latency_s=0.0)
    server.start()                      # random free port
    server.responder = lambda req: '{"explanation": "commas"}'
    server.inject("429", retry_after=0) # fault queue: the next request gets a 429
    ...
    server.requests                     # one RecordedRequest per request the server saw
    server.stop()

A responder gets a `RecordedRequest` (`.api`, `.model`, `.messages`, `.json_schema`,
`.top_logprobs`, `.body`, ...) and returns either the answer text, or a `Reply` (text plus
optional per-token logprobs, finish reason, usage override). The default responder answers a
JSON-schema request with a small instance of the schema and any other request with "ok".

Faults (`server.inject(kind, times=1, **options)`; consumed first in, first out, one per request):

| kind          | what the server does                                                           |
|---------------|--------------------------------------------------------------------------------|
| `"429"`       | 429 rate limit, `Retry-After: retry_after` (seconds; default 0) and optionally  |
|               | `retry-after-ms: retry_after_ms`                                                |
| `"500"`       | 500 internal error                                                              |
| `"503"`       | 503 unavailable                                                                 |
| `"529"`       | 529 overloaded (Anthropic body type `overloaded_error`; OpenAI gets it too)     |
| `"401"`       | 401 invalid API key                                                             |
| `"400"`       | 400 bad request                                                                 |
| `"quota"`     | no credit left: OpenAI 429 `insufficient_quota` (no Retry-After), Anthropic 402 |
|               | `billing_error`                                                                 |
| `"spend_limit"`| Anthropic's 429 `rate_limit_error` with `details.error_code`                   |
|               | `enforced_spend_limit_reached` (the API tier's monthly spend; OpenAI gets it too)|
| `"low_credit"` | Anthropic's 400 `invalid_request_error` "Your credit balance is too low..." (OpenAI gets it too) |
| `"slow"`      | sleeps `delay_s` (default 5 s) before answering normally                        |
| `"malformed"` | 200, but the content is not valid JSON (Anthropic tool requests: a text block)  |
| `"truncated"` | 200, content cut short, `finish_reason: "length"` / `stop_reason: "max_tokens"`|
| `"disconnect"`| closes the connection without any answer                                         |

Usage counts are deterministic: `count_tokens(text)` is the number of whitespace-separated words
(at least 1); a request's input tokens are the sum over its message contents (and system prompt)
plus 3 per message; output tokens are `count_tokens(answer text)`. A `Reply` may override both.
Prompt caching is reported as the real APIs do (`FakeLLMServer.prompt_cache`): OpenAI's
`usage.prompt_tokens_details.cached_tokens` for a repeated prefix of 1,024+ tokens, Anthropic's
`cache_read_input_tokens` / `cache_creation_input_tokens` for a `cache_control` system prompt.

Dialects: `server.refuse` maps a part of an OpenAI request body to the error the server answers
when that part is sent: `(status, message)`. Keys are a body field (`"logprobs"`, `"seed"`, ...)
or `"response_format.TYPE"`. `FakeLLMServer(dialect="llama.cpp")` refuses what llama-cpp-python's
server refuses: `response_format` of type `json_schema`, with HTTP 500 and the message
`LLAMA_CPP_JSON_SCHEMA_ERROR`. A schema stated in the prompt (a line that is a JSON object with
`type` or `properties`) is read as `json_schema` when the request has none, as a model would.

`server.html_status = 200` (or 404) answers every request with an HTML page instead: a base URL
that is a web site, not an API.

`server.api_key = "k"`: a chat or embeddings request with another key gets 401 (a wrong key);
`server.models = {"m"}`: a chat or embeddings request for another model gets 404 `model_not_found`.

`server.latency_s` is added to every answer (the throughput benchmark uses it);
`server.max_in_flight` is the largest number of requests the server held at once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = [
    "FakeLLMServer",
    "Fault",
    "RecordedRequest",
    "Reply",
    "count_tokens",
    "fake_embedding",
    "example_for_schema",
    "simple_logprobs",
]

LLAMA_CPP_JSON_SCHEMA_ERROR = ("1 validation error: response_format.type: Input should be 'text' or "
                               "'json_object' (input: 'json_schema')")
DIALECTS = {
    "openai": {},
    "llama.cpp": {"response_format.json_schema": (500, LLAMA_CPP_JSON_SCHEMA_ERROR)},
}

FAULT_KINDS = ("429", "500", "503", "529", "401", "400", "quota", "spend_limit", "low_credit", "slow", "malformed", "truncated",
               "disconnect")


OPENAI_CACHE_MIN, OPENAI_CACHE_STEP = 1024, 128


def count_tokens(text: str) -> int:
    """The fake tokenizer: whitespace-separated words, at least 1."""
    return max(1, len(str(text).split()))


def _content_text(content: Any) -> str:
    """A message content (string, or list of OpenAI/Anthropic content parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if "text" in part:
                    parts.append(str(part["text"]))
                elif "content" in part:
                    parts.append(_content_text(part["content"]))
                elif "input" in part:
                    parts.append(json.dumps(part["input"]))
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return str(content)


@dataclass
class Fault:
    kind: str
    retry_after: float | None = 0  # seconds, sent as Retry-After (429)
    retry_after_ms: float | None = None  # sent as retry-after-ms (429)
    delay_s: float = 5.0  # 'slow'
    api: str | None = None  # only requests of this API ('openai' / 'anthropic') take it


@dataclass
class Reply:
    """What a responder may return instead of a plain string."""

    text: str
    # per output token: (token, logprob, {alternative token: logprob}); sent when asked for
    logprobs: list[tuple[str, float, dict[str, float]]] | None = None
    finish_reason: str | None = None  # default 'stop' / 'end_turn'
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass
class RecordedRequest:
    """One request the server saw, and what it answered."""

    api: str  # 'openai' | 'anthropic' | 'other'
    path: str
    headers: dict[str, str]
    body: dict
    model: str = ""
    messages: list[dict] = field(default_factory=list)  # {'role', 'content' as text}; system first
    json_schema: dict | None = None
    top_logprobs: int = 0  # 0: none asked; OpenAI: top_logprobs (logprobs=True alone -> 0 but logprobs asked)
    logprobs_asked: bool = False
    max_tokens: int | None = None
    fault: str | None = None  # the fault kind this request took, if any
    status: int | None = None  # the HTTP status sent (None: connection closed without answer)
    input_tokens: int = 0  # billed tokens of a 200 answer (0 for errors)
    output_tokens: int = 0
    cache_read_tokens: int = 0  # of input_tokens, read from the prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it (Anthropic cache_control)
    response: dict | None = None  # the JSON body sent
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def billed(self) -> bool:
        """A 200 answer (the provider would charge for it)."""
        return self.status == 200

    @property
    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


Responder = Callable[[RecordedRequest], "str | Reply"]


def example_for_schema(schema: dict | None, root: dict | None = None) -> Any:
    """A small value that satisfies a JSON schema (enough for the schemas the project uses)."""
    if not schema:
        return {}
    root = root or schema
    if "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.lstrip("#/").split("/"):
            node = node.get(part, {})
        return example_for_schema(node, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema and schema[key]:
            return example_for_schema(schema[key][0], root)
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), typ[0] if typ else "object")
    if typ == "object" or (typ is None and "properties" in schema):
        props = schema.get("properties", {})
        return {k: example_for_schema(v, root) for k, v in props.items()}
    if typ == "array":
        n = max(1, int(schema.get("minItems", 1)))
        return [example_for_schema(schema.get("items", {"type": "string"}), root) for _ in range(n)]
    if typ == "integer":
        lo = schema.get("minimum", 0)
        return int(lo)
    if typ == "number":
        return float(schema.get("minimum", 0))
    if typ == "boolean":
        return True
    if typ == "null":
        return None
    return "ok"


def default_responder(req: RecordedRequest) -> str:
    if req.json_schema is not None:
        return json.dumps(example_for_schema(req.json_schema))
    return "ok"


def simple_logprobs(text: str, top: int = 0, logprob: float = -0.01) -> list[tuple[str, float, dict]]:
    """Logprobs for `text` split on spaces: each word is sure (`logprob`), alternatives far below."""
    out = []
    words = text.split(" ")
    for i, w in enumerate(words):
        tok = w if i == 0 else " " + w
        alts = {tok: logprob}
        for j in range(max(0, top - 1)):
            alts[f"alt{j}"] = -10.0 - j
        out.append((tok, logprob, alts))
    return out


class _Server(ThreadingHTTPServer):
    """The HTTP server of a FakeLLMServer on a free port; its handlers reach the fake as
    `self.server.fake`."""

    daemon_threads = True
    request_queue_size = 1024  # listen backlog: many clients connect at once
    allow_reuse_address = True

    def __init__(self, fake: "FakeLLMServer", handler: type[BaseHTTPRequestHandler]):
        self.fake = fake
        super().__init__(("127.0.0.1", 0), handler)

    def handle_error(self, request, client_address):  # quiet: clients that time out reset sockets
        pass


class FakeLLMServer:
    """See the module docstring."""

    def __init__(self, latency_s: float = 0.0, responder: Responder | None = None, dialect: str = "openai"):
        self.latency_s = float(latency_s)
        self.refuse: dict[str, tuple[int, str]] = dict(DIALECTS[dialect])
        self.html_status: int | None = None  # set: every request gets an HTML page with this status
        self.api_key: str | None = None  # set: requests with another key get 401
        self.models: set[str] | None = None  # set: requests for another model get 404
        self.responder: Responder = responder or default_responder
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._cached_prefixes: set = set()  # what the fake prompt cache holds (prompt_cache)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeLLMServer":
        if self._httpd is not None:
            return self
        self._httpd = _Server(self, self._handler_class())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"{type(self).__name__}:{self.port}",
        )
        self._thread.start()
        return self

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url_openai(self) -> str:
        return f"{self.url}/v1"

    @property
    def base_url_anthropic(self) -> str:
        return self.url

    # ------------------------------------------------------------------ faults and log
    def inject(self, kind: str, times: int = 1, **options) -> None:
        """Queue `times` faults of `kind` (see the module docstring) for the next requests."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        with self._lock:
            for _ in range(times):
                self.faults.append(Fault(kind, **options))

    def reset(self) -> None:
        """Forget the request log, queued faults and the in-flight maximum."""
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.max_in_flight = self.in_flight

    def requests_for(self, api: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if api is None or r.api == api]

    @property
    def billed_input_tokens(self) -> int:
        return sum(r.input_tokens for r in self.requests if r.billed)

    @property
    def billed_output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests if r.billed)

    def prompt_cache(self, rec: RecordedRequest) -> tuple[int, int]:
        """(read, written) input tokens of the provider's prompt cache, as the real APIs count
        them. OpenAI caches every prompt automatically from 1,024 tokens on, in steps of 128: the
        longest such prefix of words sent before is read. Anthropic caches the system prompt
        when a block of it carries `cache_control` and it has at least 1,024 tokens (2,048 for
        Haiku): written the first time, read after."""
        if rec.api == "openai":
            words = [w for m in rec.messages for w in m["content"].split()]
            lengths = range(OPENAI_CACHE_MIN, len(words) + 1, OPENAI_CACHE_STEP)
            keys = [hash(tuple(words[:n])) for n in lengths]
            with self._lock:
                read = max((n for n, k in zip(lengths, keys) if k in self._cached_prefixes), default=0)
                self._cached_prefixes.update(keys)
            return min(read, rec.input_tokens), 0
        system = rec.body.get("system")
        if not isinstance(system, list) or not any("cache_control" in b for b in system if isinstance(b, dict)):
            return 0, 0
        text = _content_text(system)
        n = count_tokens(text)
        if n < (2048 if "haiku" in rec.model else 1024):
            return 0, 0
        with self._lock:
            seen = text in self._cached_prefixes
            self._cached_prefixes.add(text)
        return (n, 0) if seen else (0, n)

    def refusal(self, rec: RecordedRequest) -> tuple[int, str] | None:
        """The error this server answers an OpenAI request with for a part it does not take."""
        if rec.api != "openai":
            return None
        rf = rec.body.get("response_format") or {}
        if rf and f"response_format.{rf.get('type')}" in self.refuse:
            return self.refuse[f"response_format.{rf.get('type')}"]
        return next((self.refuse[k] for k in rec.body if k in self.refuse), None)

    def unknown_key_or_model(self, rec: RecordedRequest) -> tuple[int, str] | None:
        """401 for a key that is not `api_key`, 404 for a model not in `models`."""
        key = rec.headers.get("x-api-key") or rec.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and key != self.api_key:
            return 401, "Incorrect API key provided"
        if self.models is not None and rec.model not in self.models:
            return 404, f"The model `{rec.model}` does not exist or you do not have access to it."
        return None

    def _take_fault(self, api: str) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.api is None or f.api == api:
                    del self.faults[i]
                    return f
        return None

    def _enter(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


# ---------------------------------------------------------------------- request parsing
def _parse_openai(rec: RecordedRequest) -> None:
    b = rec.body
    rec.model = str(b.get("model", ""))
    rec.messages = [
        {"role": m.get("role", "user"), "content": _content_text(m.get("content"))}
        for m in b.get("messages", [])
    ]
    rf = b.get("response_format") or {}
    if rf.get("type") == "json_schema":
        rec.json_schema = (rf.get("json_schema") or {}).get("schema") or {}
    elif rf.get("type") == "json_object":
        rec.json_schema = _schema_in_prompt(rec.messages) or {}
    else:
        rec.json_schema = _schema_in_prompt(rec.messages)
    rec.logprobs_asked = bool(b.get("logprobs"))
    rec.top_logprobs = int(b.get("top_logprobs") or 0) if rec.logprobs_asked else 0
    mt = b.get("max_completion_tokens", b.get("max_tokens"))
    rec.max_tokens = int(mt) if mt is not None else None


def _schema_in_prompt(messages: list[dict]) -> dict | None:
    """A JSON schema stated on a line of the prompt, as a model reading it would find it."""
    for m in messages:
        for line in m["content"].splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and ("properties" in value or "type" in value):
                return value
    return None


def _parse_anthropic(rec: RecordedRequest) -> None:
    b = rec.body
    rec.model = str(b.get("model", ""))
    msgs = []
    system = b.get("system")
    if system:
        msgs.append({"role": "system", "content": _content_text(system)})
    for m in b.get("messages", []):
        msgs.append({"role": m.get("role", "user"), "content": _content_text(m.get("content"))})
    rec.messages = msgs
    tool = _forced_tool(b)
    if tool is not None:
        rec.json_schema = tool.get("input_schema") or {}
    else:
        fmt = ((b.get("output_config") or {}).get("format")) or b.get("output_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            rec.json_schema = fmt.get("schema") or {}
    mt = b.get("max_tokens")
    rec.max_tokens = int(mt) if mt is not None else None


def _forced_tool(body: dict) -> dict | None:
    """The tool the request forces (tool_choice type 'tool', or 'any' with exactly one tool)."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {}
    if not tools:
        return None
    if choice.get("type") == "tool":
        for t in tools:
            if t.get("name") == choice.get("name"):
                return t
    if choice.get("type") == "any" or len(tools) == 1:
        return tools[0]
    return None


def _input_tokens(rec: RecordedRequest) -> int:
    return sum(count_tokens(m["content"]) if m["content"] else 0 for m in rec.messages) + 3 * len(
        rec.messages
    )


# ---------------------------------------------------------------------- responses
def _openai_error(status: int, message: str, typ: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": typ, "param": None, "code": code}}


def _anthropic_error(typ: str, message: str, error_code: str | None = None) -> dict:
    body = {"type": "error", "error": {"type": typ, "message": message}}
    if error_code:
        body["error"]["details"] = {"error_code": error_code}
    return body


# the answers of an account without credit: (status, body) per API, as the providers send them
_QUOTA_ERRORS = {
    "quota": {
        "openai": (429, _openai_error(429, "You exceeded your current quota, please check your plan and billing "
                                           "details.", "insufficient_quota", "insufficient_quota")),
        "anthropic": (402, _anthropic_error("billing_error", "Your credit balance is too low to access the "
                                                             "Anthropic API.")),
    },
    "spend_limit": {
        api: (429, _anthropic_error("rate_limit_error", "You have reached your specified API usage limits.",
                                    "enforced_spend_limit_reached"))
        for api in ("openai", "anthropic")
    },
    # Anthropic's older answer for an empty credit balance: a plain 400 only its message tells apart
    "low_credit": {
        api: (400, _anthropic_error("invalid_request_error", "Your credit balance is too low to access the "
                                    "Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."))
        for api in ("openai", "anthropic")
    },
}


_ERRORS = {
    # kind: (status, openai type, anthropic type, message)
    "429": (429, "rate_limit_exceeded", "rate_limit_error", "Rate limit reached; try again later."),
    "500": (500, "server_error", "api_error", "Internal server error."),
    "503": (503, "server_error", "api_error", "Service unavailable."),
    "529": (529, "server_error", "overloaded_error", "Overloaded"),
    "401": (401, "invalid_api_key", "authentication_error", "Incorrect API key provided."),
    "400": (400, "invalid_request_error", "invalid_request_error", "Bad request."),
}


def _token_bytes(tok: str) -> list[int]:
    return list(tok.encode("utf-8"))


def _openai_body(rec: RecordedRequest, reply: Reply) -> dict:
    logprobs = None
    if rec.logprobs_asked and reply.logprobs is not None:
        content = []
        for tok, lp, alts in reply.logprobs:
            top = sorted(alts.items(), key=lambda kv: -kv[1])[: rec.top_logprobs]
            content.append(
                {
                    "token": tok,
                    "logprob": lp,
                    "bytes": _token_bytes(tok),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": _token_bytes(t)} for t, v in top
                    ],
                }
            )
        logprobs = {"content": content, "refusal": None}
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": rec.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": reply.finish_reason or "stop",
            }
        ],
        "usage": {
            "prompt_tokens": rec.input_tokens,
            "completion_tokens": rec.output_tokens,
            "total_tokens": rec.input_tokens + rec.output_tokens,
            "prompt_tokens_details": {"cached_tokens": rec.cache_read_tokens},
        },
        "system_fingerprint": "fp_fake",
    }


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens"}


def _anthropic_body(rec: RecordedRequest, reply: Reply, malformed: bool) -> dict:
    tool = _forced_tool(rec.body)
    stop = _ANTHROPIC_STOP.get(reply.finish_reason or "stop", reply.finish_reason or "end_turn")
    content: list[dict]
    if tool is not None and not malformed and stop != "max_tokens":
        try:
            value = json.loads(reply.text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            content = [
                {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:20], "name": tool["name"],
                 "input": value}
            ]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": reply.text}]
    else:
        content = [{"type": "text", "text": reply.text}]
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": rec.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": rec.input_tokens - rec.cache_read_tokens - rec.cache_write_tokens,
            "output_tokens": rec.output_tokens,
            "cache_creation_input_tokens": rec.cache_write_tokens,
            "cache_read_input_tokens": rec.cache_read_tokens,
        },
    }


def _retry_headers(fault: Fault) -> dict[str, str]:
    """The Retry-After / retry-after-ms headers of a 429 fault."""
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = f"{fault.retry_after_ms:g}"
    return headers


def _faulty_reply(reply: Reply, fault: Fault | None) -> Reply:
    """The responder's reply as a 'malformed' or 'truncated' fault changes it."""
    if fault is not None and fault.kind == "malformed":
        reply = Reply(text='{"this is": not json', finish_reason="stop")
    if fault is not None and fault.kind == "truncated":
        cut = max(1, len(reply.text) // 2)
        reply = Reply(text=reply.text[:cut], logprobs=(reply.logprobs or [])[:1] or None,
                      finish_reason="length")
    return reply


def _api_of(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "openai"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/messages"):
        return "anthropic"
    return "other"


class _Handler(BaseHTTPRequestHandler):
    """Answers for the FakeLLMServer at `self.server.fake`."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"
    disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stalls on small answers

    def log_message(self, format, *args):  # quiet
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # headers and body in one write
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(data)
        try:
            self.flush_headers()
        except OSError:
            self.close_connection = True

    def _send_page(self, status: int, page: str) -> None:
        data = page.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(404, {"error": {"message": "not found", "type": "not_found"}})

    def do_POST(self):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        path = self.path.split("?")[0].rstrip("/")
        rec = RecordedRequest(
            api=_api_of(path), path=path, headers={k.lower(): v for k, v in self.headers.items()},
            body=body, started_at=time.monotonic(),
        )
        fake._enter(rec)
        try:
            self._answer(rec)
        finally:
            rec.finished_at = time.monotonic()
            fake._leave()

    def _answer(self, rec: RecordedRequest) -> None:
        fake = self.server.fake
        if fake.html_status is not None:  # a web page, not an API
            rec.status = fake.html_status
            self._send_page(fake.html_status, "<!doctype html><html><body><h1>Welcome</h1></body></html>")
            return
        if rec.api == "embeddings":
            self._answer_embeddings(rec)
            return
        if rec.api == "other":
            rec.status = 404
            self._send(404, {"error": {"message": f"no route {rec.path}", "type": "not_found"}})
            return
        if not self._authorized_and_parsed(rec) or self._refused(rec):
            return
        fault = fake._take_fault(rec.api)
        rec.fault = fault.kind if fault else None
        if fake.latency_s > 0:
            time.sleep(fake.latency_s)
        if self._answered_by_fault(rec, fault):
            return
        self._reply(rec, fault)

    def _authorized_and_parsed(self, rec: RecordedRequest) -> bool:
        """Parse a chat request that carries a key; answer 401 (and return False) to one without."""
        if rec.api == "anthropic":
            if not rec.headers.get("x-api-key") and not rec.headers.get("authorization"):
                rec.status = 401
                self._send(401, _anthropic_error("authentication_error", "missing x-api-key"))
                return False
            _parse_anthropic(rec)
        else:
            if not rec.headers.get("authorization"):
                rec.status = 401
                self._send(401, _openai_error(401, "missing API key", "invalid_request_error"))
                return False
            _parse_openai(rec)
        return True

    def _refused(self, rec: RecordedRequest) -> bool:
        """Answer the error for a refused part, a wrong key or an unknown model, if any."""
        fake = self.server.fake
        refused = fake.refusal(rec) or fake.unknown_key_or_model(rec)
        if refused is None:
            return False
        rec.status, message = refused
        rec.response = _openai_error(rec.status, message, "invalid_request_error")
        self._send(rec.status, rec.response)
        return True

    def _answered_by_fault(self, rec: RecordedRequest, fault: Fault | None) -> bool:
        """Disconnect or send the error of a fault; a 'slow' fault sleeps and lets the answer go on."""
        if fault is None:
            return False
        if fault.kind == "disconnect":
            rec.status = None
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if fault.kind in _QUOTA_ERRORS:
            rec.status, rec.response = _QUOTA_ERRORS[fault.kind][rec.api]
            self._send(rec.status, rec.response)
            return True
        if fault.kind in _ERRORS:
            status, otype, atype, msg = _ERRORS[fault.kind]
            headers = _retry_headers(fault) if fault.kind == "429" else {}
            body = (
                _anthropic_error(atype, msg)
                if rec.api == "anthropic"
                else _openai_error(status, msg, otype, otype)
            )
            rec.status = status
            rec.response = body
            self._send(status, body, headers)
            return True
        if fault.kind == "slow":
            time.sleep(fault.delay_s)
        return False

    def _reply(self, rec: RecordedRequest, fault: Fault | None) -> None:
        """The 200 answer: the responder's reply (as a fault changes it), billed and cached."""
        fake = self.server.fake
        try:
            out = fake.responder(rec)
        except Exception as err:  # a broken responder is a 500, visible in the log
            rec.status = 500
            body = {"error": {"message": f"responder failed: {err!r}", "type": "server_error"}}
            rec.response = body
            self._send(500, body)
            return
        reply = _faulty_reply(out if isinstance(out, Reply) else Reply(text=str(out)), fault)
        rec.input_tokens = reply.input_tokens if reply.input_tokens is not None else _input_tokens(rec)
        rec.output_tokens = (
            reply.output_tokens if reply.output_tokens is not None else count_tokens(reply.text)
        )
        rec.cache_read_tokens, rec.cache_write_tokens = fake.prompt_cache(rec)
        if rec.api == "openai":
            body = _openai_body(rec, reply)
        else:
            body = _anthropic_body(rec, reply, malformed=fault is not None and fault.kind == "malformed")
        rec.status = 200
        rec.response = body
        self._send(200, body, {"x-request-id": "req_" + uuid.uuid4().hex[:16]})

    def _answer_embeddings(self, rec: RecordedRequest) -> None:
        """OpenAI `POST /v1/embeddings`: deterministic bag-of-words vectors (see fake_embedding);
        faults queued for api 'openai' (or any) apply as to chat requests."""
        if not rec.headers.get("authorization"):
            rec.status = 401
            self._send(401, _openai_error(401, "missing API key", "invalid_request_error"))
            return
        texts = rec.body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        rec.model = str(rec.body.get("model", ""))
        rec.messages = [{"role": "user", "content": str(t)} for t in texts]
        if self._refused(rec):
            return
        fault = self.server.fake._take_fault("openai")
        rec.fault = fault.kind if fault else None
        if fault is not None and fault.kind in _ERRORS:
            status, otype, _, msg = _ERRORS[fault.kind]
            rec.status = status
            self._send(status, _openai_error(status, msg, otype, otype),
                       {"Retry-After": "0"} if fault.kind == "429" else None)
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        rec.input_tokens = sum(count_tokens(t) for t in texts)
        body = {"object": "list", "model": rec.model,
                "data": [{"object": "embedding", "index": i, "embedding": fake_embedding(str(t))}
                         for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": rec.input_tokens, "total_tokens": rec.input_tokens}}
        rec.status = 200
        rec.response = {"n": len(texts)}
        self._send(200, body)


EMBED_DIM = 64


def fake_embedding(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic embedding: each lower-cased word adds 1 at a hashed coordinate, so texts
    sharing words are close and texts sharing none are orthogonal (mostly)."""
    import hashlib

    vec = [0.0] * dim
    for word in str(text).lower().split():
        w = "".join(ch for ch in word if ch.isalnum())
        if w:
            vec[int(hashlib.sha256(w.encode()).hexdigest(), 16) % dim] += 1.0
    return vec



def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fake_llm --latency 0.2`: serve until stdin closes; prints `PORT n` first,
    and `MAX_IN_FLIGHT n` / `REQUESTS n` when it stops (benchmarks run it as a child process)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args(argv)
    server = FakeLLMServer(latency_s=args.latency).start()
    print(f"PORT {server.port}", flush=True)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    server.stop()
    print(f"MAX_IN_FLIGHT {server.max_in_flight}", flush=True)
    print(f"REQUESTS {len(server.requests)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def point_sdks_at(monkeypatch, server) -> None:
    """The OpenAI and Anthropic SDKs' own variables, set to a fake server on 127.0.0.1."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url_openai)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url_anthropic)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
