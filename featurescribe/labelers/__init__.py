"""Explainers: they turn a feature's sampled `explain` windows into explanation candidates.

- `LLMExplainer(client, method='pairs'|'highlighted'|'marked', answer='json'|'text')`: an LLM
  writes the explanation (local models: `marked` windows and a plain-text answer by default);
- `TokenListExplainer` (`baseline:tokens`): no LLM, names the tokens the feature fires on most.

`make_explainer(spec, client=...)` picks one from a BACKEND spec (labelers/registry.py).
Explainers get their LLM client handed to them (made by `featurescribe.llm.make_client`) and
never touch the database.
"""

from __future__ import annotations

from featurescribe.labelers.base import EXPLANATION_SCHEMA, ExplainOutcome, Explainer, explain_windows
from featurescribe.labelers.base import parse_explanation, parse_text_explanation
from featurescribe.labelers.baseline import TokenListExplainer, quote_token
from featurescribe.labelers.llm_explainer import ANSWERS, METHODS, LLMExplainer, render_explain_prompt
from featurescribe.labelers.llm_explainer import format_highlighted, format_marked, format_pairs
from featurescribe.labelers.registry import EXPLAINERS, ExplainerKind, check_explainer_spec, default_method
from featurescribe.labelers.registry import is_llm_explainer, make_explainer, method_name, resolve_method

__all__ = [
    "ANSWERS",
    "EXPLAINERS",
    "ExplainerKind",
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
    "method_name",
    "parse_explanation",
    "parse_text_explanation",
    "quote_token",
    "render_explain_prompt",
    "resolve_method",
]
