"""The small interface every LLM backend sits behind, and the errors it raises.

Labelers and scorers see only `ChatRequest`, `ChatResponse` and `LLMClient.chat`; the client
(llm/client.py) adds retries, limits, the cache, the ledger and the budget around a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

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


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token -> logprob


@dataclass
class ChatResponse:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    cached: bool = False
    raw: dict[str, Any] | None = None


class LLMError(Exception):
    """Base of the LLM layer's errors."""


class UnparseableResponse(LLMError):
    """Raised by a parse function: the answer does not have the asked-for form. It is asked again."""


class LLMCallFailed(LLMError):
    """A call ended without a usable answer after its retries; it is recorded in the ledger."""


class BudgetExceeded(LLMError):
    """The run's spend reached --budget-usd: no new call starts."""


class LLMClient(Protocol):
    """What labelers and scorers are handed."""

    spec: str  # e.g. 'openai:gpt-4o-mini'
    backend: str  # 'openai' | 'anthropic' | 'local'
    model: str
    supports_logprobs: bool

    async def chat(
        self, request: ChatRequest, parse: Callable[[ChatResponse], T] | None = None
    ) -> T | ChatResponse:
        """Send `request`; with `parse`, return its result, asking again on UnparseableResponse."""
        ...


def parse_backend_spec(spec: str) -> tuple[str, str]:
    """'openai:gpt-4o-mini' -> ('openai', 'gpt-4o-mini'); 'lexical' -> ('lexical', '')."""
    kind, _, model = spec.partition(":")
    return kind.strip().lower(), model.strip()
