"""The small interface every LLM backend sits behind, and the errors it raises.

Labelers and scorers see only `ChatRequest`, `ChatResponse` and `LLMClient.chat`; the client
(llm/client.py) adds retries, limits, the cache, the ledger and the budget around a backend.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
import json
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from featurescribe.errors import FeaturescribeError

T = TypeVar("T")


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion. `messages` are {'role': 'system'|'user'|'assistant', 'content': str}."""

    messages: tuple[dict, ...]
    purpose: str = "chat"  # 'explain' | 'simulate' | 'detect' | 'fuzz' | ...
    max_tokens: int = 512
    temperature: float = 0.0
    json_schema: dict | None = None  # ask for structured output matching this JSON schema
    top_logprobs: int = 0  # > 0: ask for logprobs with this many alternatives per token
    seed: int | None = None  # distinguishes candidates sampled at temperature > 0 (and the cache key)
    # the parse function judges an answer cut at max_tokens itself (e.g. it only needs the first
    # sentence); otherwise a cut answer is unusable and asked again
    accept_truncated: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token -> logprob


@dataclass
class ChatResponse:
    text: str
    input_tokens: int = 0  # all input tokens, those read from or written to a prompt cache included
    output_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    cached: bool = False
    raw: dict[str, Any] | None = None
    # of input_tokens: read from the provider's prompt cache (OpenAI prompt_tokens_details.
    # cached_tokens, Anthropic cache_read_input_tokens) and written to it (Anthropic
    # cache_creation_input_tokens); each priced as such
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    # filled by the client: what the answer cost, how many attempts it took, how long the last took
    cost_usd: float = 0.0
    attempts: int = 1
    latency_s: float | None = None

    @property
    def truncated(self) -> bool:
        """The answer stopped at max_tokens (OpenAI 'length', Anthropic 'max_tokens')."""
        return self.finish_reason in ("length", "max_tokens")

    def json(self) -> Any:
        """The text parsed as JSON; UnparseableResponse when it is not JSON."""
        try:
            return json.loads(self.text)
        except (TypeError, ValueError) as err:
            raise UnparseableResponse(f"answer is not valid JSON: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The cacheable part of the answer."""
        return {
            "text": self.text,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "finish_reason": self.finish_reason,
            "logprobs": None
            if self.logprobs is None
            else [[t.token, t.logprob, t.top] for t in self.logprobs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], cached: bool = False) -> "ChatResponse":
        lps = d.get("logprobs")
        return cls(
            text=d.get("text", ""),
            input_tokens=int(d.get("input_tokens") or 0),
            output_tokens=int(d.get("output_tokens") or 0),
            cached_input_tokens=int(d.get("cached_input_tokens") or 0),
            cache_write_tokens=int(d.get("cache_write_tokens") or 0),
            finish_reason=d.get("finish_reason"),
            logprobs=None if lps is None else [TokenLogprob(t, float(lp), dict(top or {})) for t, lp, top in lps],
            cached=cached,
        )


class LLMError(Exception):
    """Base of the LLM layer's errors."""


class CandidateNotOneToken(ValueError):
    """A candidate of `candidate_probs` is not one token of the model's tokenizer (e.g. "10"
    for SmolLM2): the caller may ask again with fewer candidates."""

    def __init__(self, candidate: str, message: str):
        super().__init__(message)
        self.candidate = candidate


class UnparseableResponse(LLMError):
    """Raised by a parse function: the answer does not have the asked-for form. It is asked again."""


class LLMCallFailed(LLMError):
    """A call ended without a usable answer after its retries; it is recorded in the ledger."""


class ModelNotFound(LLMCallFailed):
    """The provider has no such model or route (404): every further call would fail too."""


class BudgetExceeded(LLMError):
    """The run's spend reached --budget-usd: no new call starts."""


async def gather_settled(*aws: Awaitable[T]) -> list[T]:
    """`asyncio.gather`, but the first error is raised only once every call has ended: a request
    still in flight when a sibling stops (the budget, a failed call) gets its paid answer into the
    ledger and the cache before the caller goes on and closes the client under it."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


class MissingAPIKey(FeaturescribeError):
    """The backend's API key variable is not set (raised by make_client, before any work)."""


class NotAnLLMBackend(FeaturescribeError):
    """make_client was given a baseline (`baseline:...`, `lexical`) or an unknown backend."""


class LLMClient(Protocol):
    """What labelers and scorers are handed."""

    spec: str  # e.g. 'openai:gpt-4o-mini'
    backend: str  # 'openai' | 'anthropic' | 'local'
    model: str
    supports_logprobs: bool

    supports_candidate_probs: bool  # True for local models (one forward pass, see LocalClient)

    async def chat(
        self, request: ChatRequest, parse: Callable[[ChatResponse], T] | None = None
    ) -> T | ChatResponse:
        """Send `request`; with `parse`, return its result, asking again on UnparseableResponse."""
        ...


def parse_backend_spec(spec: str) -> tuple[str, str]:
    """'openai:gpt-4o-mini' -> ('openai', 'gpt-4o-mini'); 'lexical' -> ('lexical', '')."""
    kind, _, model = spec.partition(":")
    return kind.strip().lower(), model.strip()
