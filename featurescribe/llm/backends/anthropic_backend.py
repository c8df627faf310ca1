"""`anthropic:MODEL`: the Messages API through the anthropic SDK (AsyncAnthropic).

`ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY` are read by the SDK. Structured output: we offer
one tool, `answer`, whose `input_schema` is the asked-for JSON schema, and force it with
`tool_choice`; the tool's input is the answer (returned as JSON text, like OpenAI's). This works
on every Claude model that has tool use, and the SDK/API validate the schema shape. A schema
that is not an object is wrapped as `{"value": schema}` and unwrapped again. System messages go
into `system`, marked with `cache_control` (the API caches a system prompt of at least 1,024
tokens, 2,048 for Haiku, and bills reads at a tenth of the input price; ours are shorter, so this
only pays with long prompts). Anthropic gives no logprobs. Temperature is not sent (this SDK no longer takes
it; the models sample with their defaults): distinct candidates come from distinct seeds in the
cache key, not from the API.
"""

from __future__ import annotations

import json
import os

from featurescribe.llm.backends.base import Backend, PerLoop, Shards
from featurescribe.llm.base import ChatRequest, ChatResponse, MissingAPIKey

TOOL_NAME = "answer"


def wrap_schema(schema: dict) -> tuple[dict, bool]:
    """(an object schema for the tool, whether the answer is wrapped in {"value": ...})."""
    if isinstance(schema, dict) and (schema.get("type") == "object" or "properties" in schema):
        return schema, False
    return {"type": "object", "properties": {"value": schema}, "required": ["value"]}, True


class AnthropicBackend(Backend):
    backend = "anthropic"
    supports_logprobs = False

    SHARD = 16  # connections per SDK client (see backends.base.Shards)

    def __init__(self, model: str, *, timeout_s: float = 60.0, pool_size: int = 64):
        self.model = model
        self.pool_size = pool_size
        if not os.environ.get("ANTHROPIC_API_KEY") and not os.environ.get("ANTHROPIC_AUTH_TOKEN"):
            raise MissingAPIKey(
                "ANTHROPIC_API_KEY is not set; export ANTHROPIC_API_KEY=sk-ant-..., "
                "or use another backend (openai:MODEL, local:MODEL)"
            )
        self._timeout = timeout_s
        self.endpoint = os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
        self._sdk = PerLoop(self._make_sdk)

    def _make_sdk(self) -> Shards:
        import httpx
        from anthropic import AsyncAnthropic, DefaultAsyncHttpxClient

        k = max(1, -(-self.pool_size // self.SHARD))
        n = max(4, -(-self.pool_size // k))
        return Shards([
            AsyncAnthropic(max_retries=0, timeout=self._timeout, http_client=DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)))
            for _ in range(k)
        ])

    def params(self, request: ChatRequest, max_tokens: int) -> tuple[dict, bool]:
        system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
        messages = [
            {"role": m["role"], "content": m["content"]} for m in request.messages if m["role"] != "system"
        ]
        kw: dict = {"model": self.model, "max_tokens": max_tokens, "messages": messages}
        if system:  # marked for the prompt cache: Anthropic caches it when it is long enough
            kw["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        wrapped = False
        if request.json_schema is not None:
            schema, wrapped = wrap_schema(request.json_schema)
            kw["tools"] = [{
                "name": TOOL_NAME,
                "description": "Give your answer in exactly this form.",
                "input_schema": schema,
            }]
            kw["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
        return kw, wrapped

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float, retry_index: int = 0) -> ChatResponse:
        sdk = self._sdk.get().next()
        kw, wrapped = self.params(request, max_tokens)
        r = await sdk.messages.create(**kw, timeout=timeout)
        text = None
        if request.json_schema is not None:
            for block in r.content:
                if getattr(block, "type", None) == "tool_use" and block.name == TOOL_NAME:
                    value = block.input
                    if wrapped and isinstance(value, dict) and "value" in value:
                        value = value["value"]
                    text = json.dumps(value)
                    break
        if text is None:  # plain text, or the model did not use the tool (the parse will say so)
            text = "".join(getattr(b, "text", "") for b in r.content if getattr(b, "type", None) == "text")
        usage = r.usage
        read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        written = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        return ChatResponse(
            text=text,  # Anthropic's input_tokens leaves out the cached ones: the total is their sum
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0) + read + written,
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            cached_input_tokens=read,
            cache_write_tokens=written,
            finish_reason=r.stop_reason,
            raw={"id": r.id, "model": r.model},
        )

    async def aclose(self) -> None:
        await self._sdk.aclose()
