"""The one LLM client layer: every LLM call of featurescribe goes through here.

    from featurescribe.llm import make_client, ChatRequest, Budget, CallStore

    client = make_client("openai:gpt-4o-mini", store=CallStore(con), run_id=run_id,
                         budget=Budget(limit_usd=2.0), concurrency=32)
    resp = await client.chat(ChatRequest(messages=({"role": "user", "content": "..."},)))

See `client.py` for what a call does (cache, budget, limits, retries, ledger), `backends/` for
the providers, `prices.py` for the price table.
"""

from featurescribe.llm.base import (
    BudgetExceeded,
    ChatRequest,
    ChatResponse,
    LLMCallFailed,
    LLMClient,
    LLMError,
    MissingAPIKey,
    ModelNotFound,
    NotAnLLMBackend,
    TokenLogprob,
    UnparseableResponse,
    parse_backend_spec,
)
from featurescribe.llm.breaker import BackendBroken, LLMAuthFailed, QuotaExhausted
from featurescribe.llm.budget import Budget, budget_message
from featurescribe.llm.client import (
    Client,
    ClientSettings,
    cache_key,
    make_client,
)
from featurescribe.llm.registry import BACKENDS, BackendKind, check_backend, register_backend
from featurescribe.llm.prices import PriceTable
from featurescribe.store.llm_calls import CallRow, CallStore, load_cache
from featurescribe.store.memory_calls import MemoryCallStore

__all__ = [
    "BACKENDS",
    "BackendKind",
    "register_backend",
    "BackendBroken",
    "Budget",
    "BudgetExceeded",
    "CallRow",
    "CallStore",
    "ChatRequest",
    "ChatResponse",
    "Client",
    "ClientSettings",
    "LLMAuthFailed",
    "LLMCallFailed",
    "LLMClient",
    "MemoryCallStore",
    "LLMError",
    "MissingAPIKey",
    "ModelNotFound",
    "NotAnLLMBackend",
    "PriceTable",
    "QuotaExhausted",
    "TokenLogprob",
    "UnparseableResponse",
    "budget_message",
    "cache_key",
    "load_cache",
    "check_backend",
    "make_client",
    "parse_backend_spec",
]
