"""The LLM explainers: show a feature's `explain` windows to an LLM and ask what it responds to.

Two ways of showing the windows (`method`), each with its template in `featurescribe/prompts/`:

- `pairs` (explain_pairs.txt): every token on its own line with its activation on the 0-10
  scale, as in Bills et al. 2023;
- `highlighted` (explain_highlighted.txt): the text of each window with the active tokens
  inside << >>, and the active tokens with their activations listed after it (shorter prompts).

Activations are put on the 0-10 scale with `records.discretize`, the maximum being the largest
activation over the windows shown. The answer is JSON `{"explanation": "..."}`, parsed strictly
(`parse_explanation`); the LLM layer asks again when it does not parse, and an explanation that
never parses is a failed outcome. With `n` > 1 the candidates are sampled at `temperature` with
seeds 1..n (distinct cache keys); a single explanation is asked at temperature 0.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Sequence

from featurescribe.labelers.base import (
    EXPLANATION_SCHEMA,
    ExplainOutcome,
    Explainer,
    explain_windows,
    first_error_line,
    parse_explanation,
)
from featurescribe.llm.base import BudgetExceeded, ChatRequest, LLMError
from featurescribe.records import FeatureExamples, Window, discretize
from featurescribe.scorers.prompts import render_messages, show_token

METHODS = ("pairs", "highlighted")


def _scale_max(windows: Sequence[Window]) -> float:
    return max((w.max_act for w in windows), default=0.0)


def format_pairs(windows: Sequence[Window]) -> str:
    """Each window as 'Excerpt i:' and one `token<TAB>activation` line per token."""
    top = _scale_max(windows)
    blocks = []
    for i, w in enumerate(windows, 1):
        lines = [f"Excerpt {i}:"]
        lines += [f"{show_token(t)}\t{v}" for t, v in zip(w.tokens, discretize(w.acts, top))]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_highlighted(windows: Sequence[Window]) -> str:
    """Each window's text with the active tokens (1 or more on the scale) inside << >>, then
    the active tokens, JSON-quoted, with their activations."""
    top = _scale_max(windows)
    blocks = []
    for i, w in enumerate(windows, 1):
        parts, active = [], []
        for t, v in zip(w.tokens, discretize(w.acts, top)):
            shown = show_token(t)
            if v > 0:
                parts.append(f"<<{shown}>>")
                active.append(f"{json.dumps(t, ensure_ascii=False)} {v}")
            else:
                parts.append(shown)
        listing = ", ".join(active) if active else "none"
        blocks.append(f"Excerpt {i}: {''.join(parts)}\nActive tokens: {listing}")
    return "\n\n".join(blocks)


_FORMATS = {"pairs": format_pairs, "highlighted": format_highlighted}


def render_explain_prompt(feature: FeatureExamples, method: str = "pairs",
                          max_windows: int | None = None) -> tuple[dict, ...]:
    """The chat messages asking for an explanation of `feature` from its `explain` windows."""
    if method not in _FORMATS:
        raise ValueError(f"unknown explainer method {method!r}: use {', '.join(METHODS)}")
    windows = explain_windows(feature, max_windows)
    return render_messages(f"explain_{method}", n_excerpts=len(windows),
                           examples=_FORMATS[method](windows))


class LLMExplainer(Explainer):
    """An explainer backed by an LLM client (`openai:`, `anthropic:`, `local:`)."""

    def __init__(self, client: Any, method: str = "pairs", *, max_windows: int | None = None,
                 temperature: float = 0.7, max_tokens: int = 160):
        if method not in METHODS:
            raise ValueError(f"unknown explainer method {method!r}: use {', '.join(METHODS)}")
        self.client = client
        self.spec = client.spec
        self.method = method
        self.max_windows = max_windows
        self.temperature = temperature
        self.max_tokens = max_tokens

    def request(self, feature: FeatureExamples, candidate: int = 0, n: int = 1) -> ChatRequest:
        sampled = n > 1
        return ChatRequest(
            messages=render_explain_prompt(feature, self.method, self.max_windows),
            purpose="explain",
            max_tokens=self.max_tokens,
            temperature=self.temperature if sampled else 0.0,
            json_schema=EXPLANATION_SCHEMA,
            seed=candidate + 1 if sampled else None,
        )

    async def _one(self, feature: FeatureExamples, candidate: int, n: int) -> ExplainOutcome:
        req = self.request(feature, candidate, n)
        try:
            text = await self.client.chat(req, parse=parse_explanation)
        except BudgetExceeded as err:
            return ExplainOutcome(candidate, None, first_error_line(err), req.seed, stopped=True)
        except LLMError as err:
            return ExplainOutcome(candidate, None, first_error_line(err), req.seed)
        return ExplainOutcome(candidate, text, None, req.seed)

    async def explain(self, feature: FeatureExamples, n: int = 1) -> list[ExplainOutcome]:
        if not explain_windows(feature):
            return [ExplainOutcome(c, None, "no explain windows") for c in range(n)]
        return list(await asyncio.gather(*(self._one(feature, c, n) for c in range(n))))
