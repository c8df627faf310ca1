"""Explainers: they turn a feature's sampled `explain` windows into explanation candidates.

- `LLMExplainer(client, method='pairs'|'highlighted'|'marked', answer='json'|'text')`: an LLM
  writes the explanation (local models: `marked` windows and a plain-text answer by default);
- `TokenListExplainer` (`baseline:tokens`): no LLM, names the tokens the feature fires on most.

`make_explainer(spec, client=...)` picks one from a BACKEND spec. Explainers get their LLM client
handed to them (made by `featurescribe.llm.make_client`) and never touch the database.
"""

from __future__ import annotations

from typing import Any

from featurescribe.labelers.base import (
    EXPLANATION_SCHEMA,
    ExplainOutcome,
    Explainer,
    explain_windows,
    parse_explanation,
    parse_text_explanation,
)
from featurescribe.labelers.baseline import TokenListExplainer, quote_token
from featurescribe.labelers.llm_explainer import (
    ANSWERS,
    METHODS,
    LLMExplainer,
    format_highlighted,
    format_marked,
    format_pairs,
    render_explain_prompt,
)
from featurescribe.llm.base import parse_backend_spec

BASELINE_EXPLAINERS = ("baseline:tokens",)


def is_llm_explainer(spec: str) -> bool:
    kind, _ = parse_backend_spec(spec)
    return kind not in ("baseline", "lexical")


def check_explainer_spec(spec: str) -> None:
    """ValueError for a spec that names no explainer (`lexical` is a simulator only)."""
    kind, model = parse_backend_spec(spec)
    if kind == "baseline":
        if spec.strip().lower() not in BASELINE_EXPLAINERS:
            raise ValueError(f"unknown baseline explainer {spec!r}: use baseline:tokens")
    elif kind == "lexical":
        raise ValueError("'lexical' is a simulator, not an explainer: use baseline:tokens, "
                         "openai:MODEL, anthropic:MODEL or local:MODEL")
    elif kind not in ("openai", "anthropic", "local"):
        raise ValueError(f"unknown explainer {spec!r}: use baseline:tokens, openai:MODEL, "
                         "anthropic:MODEL or local:MODEL")
    elif not model:
        raise ValueError(f"explainer {spec!r} names no model (e.g. {kind}:MODEL)")


# small local models: the shortest way of showing the windows, a plain-text answer, fewer windows
LOCAL_METHOD, LOCAL_ANSWER, LOCAL_MAX_WINDOWS = "marked", "text", 8


def default_method(spec: str) -> str:
    """The way of showing windows when none is asked: `marked` for local models, else `pairs`."""
    return LOCAL_METHOD if parse_backend_spec(spec)[0] == "local" else "pairs"


def resolve_method(spec: str, method: str | None) -> str:
    return default_method(spec) if method in (None, "", "auto") else method


def make_explainer(spec: str, *, client: Any = None, method: str | None = None,
                   max_windows: int | None = None, answer: str | None = None, **kw) -> Explainer:
    """The explainer for BACKEND `spec`; an LLM spec needs its `client`. Local models answer in
    plain text and see at most LOCAL_MAX_WINDOWS windows unless told otherwise."""
    check_explainer_spec(spec)
    if not is_llm_explainer(spec):
        return TokenListExplainer(**kw)
    if client is None:
        raise ValueError(f"explainer {spec} needs an LLM client")
    local = parse_backend_spec(spec)[0] == "local"
    if answer is None:
        answer = LOCAL_ANSWER if local else "json"
    if max_windows is None and local:
        max_windows = LOCAL_MAX_WINDOWS
    return LLMExplainer(client, resolve_method(spec, method), answer=answer, max_windows=max_windows, **kw)


__all__ = [
    "ANSWERS",
    "BASELINE_EXPLAINERS",
    "EXPLANATION_SCHEMA",
    "METHODS",
    "ExplainOutcome",
    "Explainer",
    "LLMExplainer",
    "TokenListExplainer",
    "check_explainer_spec",
    "default_method",
    "explain_windows",
    "format_highlighted",
    "format_marked",
    "format_pairs",
    "is_llm_explainer",
    "make_explainer",
    "parse_explanation",
    "parse_text_explanation",
    "quote_token",
    "render_explain_prompt",
    "resolve_method",
]
