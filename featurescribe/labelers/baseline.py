"""`baseline:tokens`: the explainer without an LLM. It names the tokens the feature fires on most.

Over the `explain` windows, each distinct token string collects the activation mass the feature
puts on it (the sum of its activations there). The tokens are taken in order of mass, each
holding at least `min_share` of the total, until they cover `coverage` of it or `max_tokens` are
named. The explanation quotes them in double quotes with their leading spaces, e.g.

    the tokens " def", " class" and " return"

which is the form the `lexical` simulator reads back (a token holding a double quote is put in
backticks instead; line breaks and tabs are written \n and \t). It is the floor an LLM explainer has to beat, and needs no API key.
"""

from __future__ import annotations

import json
from collections import defaultdict

from featurescribe.labelers.base import ExplainOutcome, Explainer, explain_windows, join_words
from featurescribe.records import FeatureExamples


def quote_token(token: str) -> str:
    """A token as the explanation writes it: in double quotes, or backticks if it holds one."""
    if not token.strip() or any(c in token for c in "\n\r\t"):
        return json.dumps(token)  # a line break or tab written as \n or \t
    if '"' not in token:
        return f'"{token}"'
    if "`" not in token:
        return f"`{token}`"
    return repr(token)


def token_mass(feature: FeatureExamples) -> dict[str, float]:
    """Sum of the feature's positive activations on each token string of its explain windows."""
    mass: dict[str, float] = defaultdict(float)
    for w in explain_windows(feature):
        for t, a in zip(w.tokens, w.acts):
            if a > 0:
                mass[t] += float(a)
    return dict(mass)


class TokenListExplainer(Explainer):
    spec = "baseline:tokens"
    method = "tokens"
    max_candidates = 1

    def __init__(self, max_tokens: int = 5, coverage: float = 0.9, min_share: float = 0.05):
        self.max_tokens = max_tokens
        self.coverage = coverage
        self.min_share = min_share

    def top_tokens(self, feature: FeatureExamples) -> list[str]:
        mass = token_mass(feature)
        total = sum(mass.values())
        if total <= 0:
            return []
        chosen: list[str] = []
        covered = 0.0
        for tok, m in sorted(mass.items(), key=lambda kv: (-kv[1], kv[0])):
            if chosen and (m < self.min_share * total or covered >= self.coverage * total):
                break
            chosen.append(tok)
            covered += m
            if len(chosen) >= self.max_tokens:
                break
        return chosen

    def explanation(self, feature: FeatureExamples) -> str | None:
        tokens = self.top_tokens(feature)
        if not tokens:
            return None
        names = list(dict.fromkeys(quote_token(t) for t in tokens))
        return ("the token " if len(names) == 1 else "the tokens ") + join_words(names)

    async def explain(self, feature: FeatureExamples, n: int = 1) -> list[ExplainOutcome]:
        text = self.explanation(feature)
        if text is None:
            return [ExplainOutcome(0, None, "no activations in the explain windows")]
        return [ExplainOutcome(0, text)]
