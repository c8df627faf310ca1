"""`openai:MODEL`: chat completions through the openai SDK (AsyncOpenAI).

`OPENAI_BASE_URL` and `OPENAI_API_KEY` are read by the SDK, so any OpenAI-compatible server
(vLLM, Ollama, llama.cpp's server, LM Studio) works. Structured output uses `response_format`
with a JSON schema (strict when the schema allows it); logprobs are asked with `logprobs` /
`top_logprobs`. OpenAI's reasoning models (o-series, gpt-5) give no logprobs and take no
temperature. At another base URL we assume logprobs until an answer that was asked for them
comes back without: from then on the client reports `supports_logprobs = False`.

What a server refuses (`response_format: json_schema`, `logprobs`, an unknown parameter) is
negotiated down (llm/negotiation.py): the refusal raises `RequestRejected`, and the backend asks
in the next weaker form from then on.
"""

from __future__ import annotations

import json
import logging
import os
import re

from featurescribe.errors import FeaturescribeError
from featurescribe.llm.backends.base import Backend, PerLoop, Shards
from featurescribe.llm.base import ChatRequest, ChatResponse, MissingAPIKey, TokenLogprob
from featurescribe.llm.backends.base import BadAnswer
from featurescribe.llm.negotiation import Capabilities, RequestRejected, refused_feature

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
_REASONING = re.compile(r"^(o\d|gpt-5)", re.I)


def openai_base_url() -> str:
    return os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE


def is_openai_proper(base_url: str) -> bool:
    return "api.openai.com" in base_url


def strict_ok(schema: dict) -> bool:
    """Whether OpenAI's strict mode accepts `schema` (closed objects, every property required)."""
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is not False:
            return False
        if set(schema.get("required", [])) != set(props):
            return False
        if not all(strict_ok(v) for v in props.values()):
            return False
    for key in ("items",):
        if key in schema and not strict_ok(schema[key]):
            return False
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema and not all(strict_ok(s) for s in schema[key]):
            return False
    for d in (schema.get("$defs") or {}).values():
        if not strict_ok(d):
            return False
    return True


SCHEMA_NOTE = ("Answer with one JSON value and nothing else: no code fence, no words before or "
               "after it. It must match this JSON schema:\n")


def with_schema_in_prompt(messages: list[dict], schema: dict) -> list[dict]:
    """The messages with the answer's JSON schema stated at the end of the system message."""
    note = SCHEMA_NOTE + json.dumps(schema, separators=(",", ":"))
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.S)


def strip_json_fence(text: str) -> str:
    """A JSON answer without the one markdown code fence small models wrap it in; anything else
    around the JSON is left for the strict parse to refuse."""
    stripped = (text or "").strip()
    m = _FENCE.match(stripped)
    return m.group(1).strip() if m else stripped


def _error_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class NotAnOpenAIServer(FeaturescribeError):
    """OPENAI_BASE_URL answers, but not as an OpenAI-compatible API (an HTML page, a 404 that is
    no API error): every call would fail the same way, so the run stops with this one line."""


def _is_api_error(body) -> bool:
    """An error body of an OpenAI-compatible API: {"error": ...}, or older vLLM's
    {"object": "error", "message": ...} (a web page or a framework's own 404, e.g.
    {"detail": "Not Found"}, is not)."""
    return isinstance(body, dict) and ("error" in body or "message" in body)


class OpenAIBackend(Backend):
    backend = "openai"

    def __init__(self, model: str, *, timeout_s: float = 60.0, pool_size: int = 64, http: str = "httpx",
                 structured: str = "auto"):
        self.model = model
        self.forced_structured = None if structured == "auto" else structured
        self.pool_size = pool_size
        self.http = http
        if http == "aiohttp":
            try:
                import aiohttp  # noqa: F401
            except ImportError:
                raise FeaturescribeError(
                    "FEATURESCRIBE_LLM_HTTP=aiohttp needs the aiohttp package (pip install aiohttp), "
                    "or leave it unset for the SDK's default httpx stack"
                ) from None
        self.base_url = self.endpoint = openai_base_url()
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            if is_openai_proper(self.base_url):
                raise MissingAPIKey(
                    "OPENAI_API_KEY is not set; export OPENAI_API_KEY=sk-..., or point "
                    "OPENAI_BASE_URL at an OpenAI-compatible server (vLLM, Ollama, llama.cpp), "
                    "or use a model on this machine (local:MODEL)"
                )
            key = "not-needed"  # local OpenAI-compatible servers ignore the key; the SDK wants one
        self._key = key
        self.official = is_openai_proper(self.base_url)
        self.reasoning = self.official and bool(_REASONING.match(model))
        self.caps = Capabilities(structured=self.forced_structured or "json_schema",
                                 logprobs=not self.reasoning)
        self._timeout = timeout_s
        self._sdk = PerLoop(self._make_sdk)

    SHARD = 16  # connections per SDK client

    def _make_sdk(self) -> Shards:
        import httpx
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        if self.http == "aiohttp":
            from openai import DefaultAioHttpClient

            # aiohttp's connector does not scan its connections per request: one pool of them all
            n = max(4, self.pool_size)
            return Shards([
                AsyncOpenAI(api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self._timeout,
                            http_client=DefaultAioHttpClient(
                                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)))
            ])
        # as many connections as the client's concurrency, in SDK clients of SHARD connections
        k = max(1, -(-self.pool_size // self.SHARD))
        n = max(4, -(-self.pool_size // k))
        return Shards([
            AsyncOpenAI(api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self._timeout,
                        http_client=DefaultAsyncHttpxClient(
                            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)))
            for _ in range(k)
        ])

    # ------------------------------------------------------------------ capabilities
    @property
    def supports_logprobs(self) -> bool:
        return self.caps.logprobs

    @supports_logprobs.setter
    def supports_logprobs(self, value: bool) -> None:
        self.caps.logprobs = bool(value)

    def capability_key(self) -> tuple[str, str]:
        return self.base_url, self.model

    def capabilities_record(self) -> dict:
        return {"structured": self.caps.structured, "logprobs": self.caps.logprobs,
                "dropped_params": sorted(self.caps.dropped)}

    def apply_capabilities(self, record: dict) -> None:
        """Start from what an earlier run learnt about this server + model (a forced
        `--structured` form still wins)."""
        if self.forced_structured is None and record.get("structured"):
            self.caps.structured = record["structured"]
        self.caps.logprobs = self.caps.logprobs and bool(record.get("logprobs", True))
        self.caps.dropped |= set(record.get("dropped_params") or ())

    def _adapt(self, feature: str, sent: dict) -> str | None:
        """Move off a refused feature; what changed, or None when there is nothing weaker."""
        if feature == "response_format":
            sent_form = sent["response_format"]["type"]
            if sent_form != self.caps.structured:
                return f"already asking with {self.caps.structured}"  # another call moved first
            weaker = None if self.forced_structured else self.caps.weaker_structured()
            if weaker is None:
                return None
            self.caps.structured = weaker
            return f"structured output {sent_form} -> {weaker}"
        if feature == "logprobs":
            was, self.caps.logprobs = self.caps.logprobs, False
            return "no logprobs (simulators answer in JSON instead)" if was else "already without logprobs"
        if feature in self.caps.dropped:
            return f"already without {feature}"
        self.caps.dropped.add(feature)
        return f"parameter {feature} no longer sent"

    def _rejected(self, exc: Exception, sent: dict) -> Exception:
        status = getattr(exc, "status_code", None)
        message = _error_message(exc)
        feature = refused_feature(status, message, sent)
        if feature is None:
            return exc
        change = self._adapt(feature, sent)
        what = f"HTTP {status}: {message}"
        if change is None:
            return RequestRejected(f"request rejected by {self.base_url} ({what})", feature, False)
        if not change.startswith("already"):
            log.warning("openai:%s at %s refused %s (%s): %s", self.model, self.base_url, feature,
                        what[:200], change)
        return RequestRejected(f"request rejected ({what}); {change}", feature, True)

    def _not_an_api(self, status: int, http) -> "NotAnOpenAIServer":
        kind = (http.headers.get("content-type") or "no content type").split(";")[0]
        text = " ".join((http.text or "").split())[:120]
        return NotAnOpenAIServer(
            f"{self.base_url} is not an OpenAI-compatible API: POST {self.base_url}/chat/completions "
            f"answered HTTP {status} ({kind}) {text!r}; set OPENAI_BASE_URL to the API's base URL "
            f"(it usually ends in /v1)")

    # ------------------------------------------------------------------ requests
    def params(self, request: ChatRequest, max_tokens: int) -> dict:
        kw: dict = {"model": self.model, "messages": [dict(m) for m in request.messages]}
        if self.official:
            kw["max_completion_tokens"] = max_tokens
        else:
            kw["max_tokens"] = max_tokens
        if not self.reasoning and "temperature" not in self.caps.dropped:
            kw["temperature"] = request.temperature
        if request.seed is not None and "seed" not in self.caps.dropped:
            kw["seed"] = request.seed
        if request.json_schema is not None:
            self._structured(kw, request.json_schema)
        if request.top_logprobs > 0 and self.supports_logprobs:
            kw["logprobs"] = True
            kw["top_logprobs"] = min(int(request.top_logprobs), 20)
        return kw

    def _structured(self, kw: dict, schema: dict) -> None:
        form = self.caps.structured
        if form == "json_schema":
            kw["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": strict_ok(schema)},
            }
            return
        if form == "json_object":
            # llama.cpp (both servers) turns `schema` into a grammar; servers that only know JSON
            # mode ignore it, and the schema is in the prompt either way
            kw["response_format"] = {"type": "json_object", "schema": schema}
        kw["messages"] = with_schema_in_prompt(kw["messages"], schema)

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float, retry_index: int = 0) -> ChatResponse:
        # The SDK's documented way to post a body as is (`client.post(path, cast_to=httpx.Response)`):
        # the SDK still sends it (auth, headers, timeouts) and raises its own errors, but skips
        # transforming the params and building pydantic models, which costs milliseconds a call
        # and caps a single event loop at a couple of hundred calls a second.
        import httpx

        from openai import APIStatusError

        sdk = self._sdk.get().next()
        kw = self.params(request, max_tokens)
        try:
            http = await sdk.post("/chat/completions", body=kw, cast_to=httpx.Response,
                                  options={"timeout": timeout})
        except APIStatusError as exc:
            if exc.status_code in (404, 405) and not _is_api_error(exc.body):
                raise self._not_an_api(exc.status_code, exc.response) from None
            raised = self._rejected(exc, kw)
            if raised is exc:
                raise
            raise raised from None
        try:
            r = http.json()
        except ValueError:
            raise self._not_an_api(http.status_code, http) from None
        if not isinstance(r, dict):
            raise BadAnswer(f"the server's answer is not a completion: {http.text[:200]!r}")
        resp = self.parse_completion(r, asked_logprobs="logprobs" in kw)
        if request.json_schema is not None and kw.get("response_format", {}).get("type") != "json_schema":
            resp.text = strip_json_fence(resp.text)
        return resp

    def parse_completion(self, r: dict, asked_logprobs: bool) -> ChatResponse:
        choices = r.get("choices") or []
        choice = choices[0] if choices else {}
        message = choice.get("message") or {}
        text = message.get("content") or ""
        logprobs = None
        lp = choice.get("logprobs") or {}
        content = lp.get("content") if isinstance(lp, dict) else None
        if content:
            logprobs = [
                TokenLogprob(
                    token=t.get("token", ""),
                    logprob=float(t.get("logprob", 0.0)),
                    top={a.get("token", ""): float(a.get("logprob", 0.0)) for a in (t.get("top_logprobs") or [])},
                )
                for t in content
            ]
        if asked_logprobs and logprobs is None and not self.official and text:
            self.supports_logprobs = False  # this server does not give them
        usage = r.get("usage") or {}
        return ChatResponse(
            text=text,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            cached_input_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            logprobs=logprobs,
            finish_reason=choice.get("finish_reason"),
            raw={"id": r.get("id"), "model": r.get("model")},
        )

    async def aclose(self) -> None:
        await self._sdk.aclose()
