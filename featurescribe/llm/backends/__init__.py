"""The backends behind `featurescribe.llm.Client`: they speak to one provider and nothing else.

A backend turns a `ChatRequest` into a `ChatResponse` in one attempt; retries, limits, the
cache, the ledger and the budget live in `featurescribe/llm/client.py`.
"""

from featurescribe.llm.backends.base import Backend

__all__ = ["Backend"]
