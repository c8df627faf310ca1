"""`script:MODEL`, a test-only LLM backend registered like the real ones (llm/registry.py).

It answers from a Python function instead of HTTP and keeps every request it was sent, so unit
tests drive the real `Client` (cache, ledger, retries, parsing) and the real labelers and scorers
without a server:

    with scripted(lambda req: '{"explanation": "digits"}') as script:
        client = make_client("script:any")
        ...
        script.requests  # what was asked
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from featurescribe.llm.backends.base import Backend
from featurescribe.llm.base import ChatRequest, ChatResponse
from featurescribe.llm.registry import BACKENDS, BackendKind


@dataclass
class Script:
    answer: Callable[[ChatRequest], str]
    requests: list[ChatRequest] = field(default_factory=list)
    # (messages, text) of every candidate_probs call (with candidate_probs=True)
    prob_calls: list[tuple[list[dict], str]] = field(default_factory=list)


class ScriptBackend(Backend):
    backend = "script"
    uses_timeout = False

    def __init__(self, model: str, script: Script, candidate_probs: bool):
        self.model = model
        self.script = script
        self.supports_candidate_probs = candidate_probs

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float,
                   retry_index: int = 0) -> ChatResponse:
        self.script.requests.append(request)
        text = self.script.answer(request)
        return ChatResponse(text=text, input_tokens=sum(len(m["content"]) // 4 for m in request.messages),
                            output_tokens=len(text) // 4, finish_reason="stop")

    async def candidate_probs(self, text, positions, candidates, *, messages=None, normalize=True):
        self.script.prob_calls.append((list(messages or []), text))
        return np.full((len(positions), len(candidates)), 1.0 / len(candidates)), len(text) // 4


@contextmanager
def scripted(answer: Callable[[ChatRequest], str], *, candidate_probs: bool = False) -> Iterator[Script]:
    """Register `script:` for the block; its clients answer with `answer(request)`."""
    script = Script(answer)
    BACKENDS.register(BackendKind(
        "script", lambda model, options: ScriptBackend(model, script, candidate_probs), "any",
        runs_locally=candidate_probs))
    try:
        yield script
    finally:
        BACKENDS.unregister("script")
