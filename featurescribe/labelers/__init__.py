"""Explainers: they turn a feature's sampled `explain` windows into explanation candidates.

- `LLMExplainer(client, method='pairs'|'highlighted')`: an LLM writes the explanation;
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
)
from featurescribe.labelers.baseline import TokenListExplainer, quote_token
from featurescribe.labelers.llm_explainer import (
    METHODS,
    LLMExplainer,
    format_highlighted,
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


def make_explainer(spec: str, *, client: Any = None, method: str = "pairs",
                   max_windows: int | None = None, **kw) -> Explainer:
    """The explainer for BACKEND `spec`; an LLM spec needs its `client`."""
    check_explainer_spec(spec)
    if not is_llm_explainer(spec):
        return TokenListExplainer(**kw)
    if client is None:
        raise ValueError(f"explainer {spec} needs an LLM client")
    return LLMExplainer(client, method, max_windows=max_windows, **kw)


__all__ = [
    "BASELINE_EXPLAINERS",
    "EXPLANATION_SCHEMA",
    "METHODS",
    "ExplainOutcome",
    "Explainer",
    "LLMExplainer",
    "TokenListExplainer",
    "check_explainer_spec",
    "explain_windows",
    "format_highlighted",
    "format_pairs",
    "is_llm_explainer",
    "make_explainer",
    "parse_explanation",
    "quote_token",
    "render_explain_prompt",
]
