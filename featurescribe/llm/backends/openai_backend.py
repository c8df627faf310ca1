"""`openai:MODEL`: chat completions through the openai SDK (AsyncOpenAI).

`OPENAI_BASE_URL` and `OPENAI_API_KEY` are read by the SDK, so any OpenAI-compatible server
(vLLM, Ollama, llama.cpp's server, LM Studio) works. Structured output uses `response_format`
with a JSON schema (strict when the schema allows it); logprobs are asked with `logprobs` /
`top_logprobs`. OpenAI's reasoning models (o-series, gpt-5) give no logprobs and take no
temperature. At another base URL we assume logprobs until an answer that was asked for them
comes back without: from then on the client reports `supports_logprobs = False`.
"""

from __future__ import annotations

import os
import re

from featurescribe.errors import FeaturescribeError
from featurescribe.llm.backends.base import Backend, PerLoop, Shards
from featurescribe.llm.base import ChatRequest, ChatResponse, MissingAPIKey, TokenLogprob
from featurescribe.llm.backends.base import BadAnswer

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


class OpenAIBackend(Backend):
    backend = "openai"

    def __init__(self, model: str, *, timeout_s: float = 60.0, pool_size: int = 64, http: str = "httpx"):
        self.model = model
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
        self.base_url = openai_base_url()
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            if is_openai_proper(self.base_url):
                raise MissingAPIKey(
                    "OPENAI_API_KEY is not set; export OPENAI_API_KEY=sk-..., or point "
                    "OPENAI_BASE_URL at an OpenAI-compatible server (vLLM, Ollama, llama.cpp), "
                    "or use --explainer local:MODEL"
                )
            key = "not-needed"  # local OpenAI-compatible servers ignore the key; the SDK wants one
        self._key = key
        self.official = is_openai_proper(self.base_url)
        self.reasoning = self.official and bool(_REASONING.match(model))
        self.supports_logprobs = not self.reasoning
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

    def params(self, request: ChatRequest, max_tokens: int) -> dict:
        kw: dict = {"model": self.model, "messages": [dict(m) for m in request.messages]}
        if self.official:
            kw["max_completion_tokens"] = max_tokens
        else:
            kw["max_tokens"] = max_tokens
        if not self.reasoning:
            kw["temperature"] = request.temperature
        if request.seed is not None:
            kw["seed"] = request.seed
        if request.json_schema is not None:
            kw["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.json_schema,
                                "strict": strict_ok(request.json_schema)},
            }
        if request.top_logprobs > 0 and self.supports_logprobs:
            kw["logprobs"] = True
            kw["top_logprobs"] = min(int(request.top_logprobs), 20)
        return kw

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float, retry_index: int = 0) -> ChatResponse:
        # The SDK's documented way to post a body as is (`client.post(path, cast_to=httpx.Response)`):
        # the SDK still sends it (auth, headers, timeouts) and raises its own errors, but skips
        # transforming the params and building pydantic models, which costs milliseconds a call
        # and caps a single event loop at a couple of hundred calls a second.
        import httpx

        sdk = self._sdk.get().next()
        kw = self.params(request, max_tokens)
        http = await sdk.post("/chat/completions", body=kw, cast_to=httpx.Response,
                              options={"timeout": timeout})
        try:
            r = http.json()
        except ValueError:
            raise BadAnswer(f"the server's answer is not JSON: {http.text[:200]!r}") from None
        return self.parse_completion(r, asked_logprobs="logprobs" in kw)

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
            logprobs=logprobs,
            finish_reason=choice.get("finish_reason"),
            raw={"id": r.get("id"), "model": r.get("model")},
        )

    async def aclose(self) -> None:
        await self._sdk.aclose()
