"""The LLM explainers: show a feature's `explain` windows to an LLM and ask what it responds to.

Three ways of showing the windows (`method`), each with its templates in `featurescribe/prompts/`:

- `pairs` (explain_pairs.txt): every token on its own line with its activation on the 0-10
  scale, as in Bills et al. 2023;
- `highlighted` (explain_highlighted.txt): the text of each window with the active tokens
  inside << >>, and the active tokens with their activations listed after it (shorter prompts);
- `marked` (explain_marked.txt): the text with the active tokens inside << >>, no numbers (the
  shortest; what small local models read best).

Activations are put on the 0-10 scale with `records.discretize`, the maximum being the largest
activation over the windows shown. Two ways of answering (`answer`):

- `json`: `{"explanation": "..."}` as structured output, parsed strictly (`parse_explanation`);
- `text` (the default for `local:` models, which rarely manage JSON): the prompt ends with the
  start of the answer ("Explanation: the feature is active on", an assistant prefill taken up by
  the local and Anthropic backends) and the model completes the phrase; the first sentence is
  kept and checked strictly (`parse_text_explanation`).

The LLM layer asks again when an answer does not parse, and an explanation that never parses is
a failed outcome. With `n` > 1 the candidates are sampled at `temperature` with seeds 1..n
(distinct cache keys); a single explanation is asked at temperature 0.

With `label --logit-lens` a feature carries the tokens its output direction promotes most
(`logit_lens.py`), and the prompt shows them after the excerpts (explain_logit_lens.txt).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from featurescribe.labelers.base import (
    EXPLANATION_SCHEMA,
    ExplainOutcome,
    Explainer,
    explain_windows,
    parse_explanation,
    parse_text_explanation,
)
from featurescribe.llm.base import BudgetExceeded, ChatRequest, LLMError, gather_settled
from featurescribe.records import FeatureExamples, Window, discretize
from featurescribe.errors import first_error_line
from featurescribe.prompts import render_messages, render_text, show_token

METHODS = ("pairs", "highlighted", "marked")
ANSWERS = ("json", "text")
CANDIDATE_TEMPERATURE = 0.7  # sampling temperature when a feature gets several candidates


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


def format_marked(windows: Sequence[Window]) -> str:
    """Each window's text on one line after a dash, the active tokens (1 or more on the scale)
    inside << >>. No "Excerpt i" labels: small models copy them into their answers."""
    top = _scale_max(windows)
    lines = []
    for w in windows:
        text = "".join(f"<<{show_token(t)}>>" if v > 0 else show_token(t)
                       for t, v in zip(w.tokens, discretize(w.acts, top)))
        lines.append(f"- {text}")
    return "\n".join(lines)


_FORMATS = {"pairs": format_pairs, "highlighted": format_highlighted, "marked": format_marked}


def render_explain_prompt(feature: FeatureExamples, method: str = "pairs",
                          max_windows: int | None = None, answer: str = "json") -> tuple[dict, ...]:
    """The chat messages asking for an explanation of `feature` from its `explain` windows (for
    `answer='text'` the last message is the start of the assistant's answer)."""
    if method not in _FORMATS:
        raise ValueError(f"unknown explainer method {method!r}: use {', '.join(METHODS)}")
    if answer not in ANSWERS:
        raise ValueError(f"unknown answer mode {answer!r}: use {' or '.join(ANSWERS)}")
    windows = explain_windows(feature, max_windows)
    name = f"explain_{method}" + ("_text" if answer == "text" else "")
    examples = _FORMATS[method](windows)
    if feature.promoted:
        tokens = ", ".join(json.dumps(t, ensure_ascii=False) for t in feature.promoted)
        examples += "\n\n" + render_text("explain_logit_lens", tokens=tokens).strip()
    if feature.output_rising:
        examples += "\n\n" + render_text("explain_output_effects", rising=_quoted(feature.output_rising),
                                         falling=_quoted(feature.output_falling or [])).strip()
    return render_messages(name, n_excerpts=len(windows), examples=examples)


def _quoted(tokens) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)


class LLMExplainer(Explainer):
    """An explainer backed by an LLM client (`openai:`, `anthropic:`, `local:`)."""

    def __init__(self, client: Any, method: str = "pairs", *, answer: str = "json",
                 max_windows: int | None = None, temperature: float = CANDIDATE_TEMPERATURE, max_tokens: int | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown explainer method {method!r}: use {', '.join(METHODS)}")
        if answer not in ANSWERS:
            raise ValueError(f"unknown answer mode {answer!r}: use {' or '.join(ANSWERS)}")
        self.client = client
        self.spec = client.spec
        self.method = method
        self.answer = answer
        self.max_windows = max_windows
        self.temperature = temperature
        # a text answer is one phrase: a short limit also stops a small model that rambles
        self.max_tokens = max_tokens or (160 if answer == "json" else 48)

    def request(self, feature: FeatureExamples, candidate: int = 0, n: int = 1) -> ChatRequest:
        sampled = n > 1
        return ChatRequest(
            messages=render_explain_prompt(feature, self.method, self.max_windows, self.answer),
            purpose="explain",
            max_tokens=self.max_tokens,
            temperature=self.temperature if sampled else 0.0,
            json_schema=EXPLANATION_SCHEMA if self.answer == "json" else None,
            seed=candidate + 1 if sampled else None,
            accept_truncated=self.answer == "text",  # parse_text_explanation needs one sentence only
        )

    async def _one(self, feature: FeatureExamples, candidate: int, n: int) -> ExplainOutcome:
        req = self.request(feature, candidate, n)
        parse = parse_explanation if self.answer == "json" else parse_text_explanation
        try:
            text = await self.client.chat(req, parse=parse)
        except BudgetExceeded as err:
            return ExplainOutcome(candidate, None, first_error_line(err), req.seed, stopped=True)
        except LLMError as err:
            return ExplainOutcome(candidate, None, first_error_line(err), req.seed)
        return ExplainOutcome(candidate, text, None, req.seed)

    async def explain(self, feature: FeatureExamples, n: int = 1) -> list[ExplainOutcome]:
        if not explain_windows(feature):
            return [ExplainOutcome(c, None, "no explain windows") for c in range(n)]
        return await gather_settled(*(self._one(feature, c, n) for c in range(n)))
