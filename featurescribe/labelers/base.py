"""What every explainer is: a class that turns a feature's `explain` windows into explanations.

An explainer never sees the `valid` or `test` windows (the scorers test on those). `explain`
returns one `ExplainOutcome` per candidate: the text, or the error that left it without one.
A failed outcome is recorded as failed and never scored or shown as a label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from featurescribe.llm.base import ChatResponse, UnparseableResponse
from featurescribe.records import FeatureExamples, Window

# what an LLM explainer must answer
EXPLANATION_SCHEMA = {
    "type": "object",
    "properties": {"explanation": {"type": "string"}},
    "required": ["explanation"],
    "additionalProperties": False,
}
MAX_EXPLANATION_CHARS = 400


@dataclass
class ExplainOutcome:
    """One candidate explanation of a feature, or why there is none."""

    candidate: int
    text: str | None
    error: str | None = None
    seed: int | None = None
    stopped: bool = False  # not asked: the budget was spent (the feature is left for a later run)

    @property
    def ok(self) -> bool:
        return self.text is not None and self.error is None


class Explainer:
    """Base class: `spec` names the backend ('openai:gpt-4o-mini', 'baseline:tokens'), `method`
    the way examples are shown ('pairs', 'highlighted', 'tokens')."""

    spec: str = ""
    method: str = ""
    max_candidates: int | None = None  # None: any number; 1 for a deterministic explainer

    async def explain(self, feature: FeatureExamples, n: int = 1) -> list[ExplainOutcome]:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def explain_windows(feature: FeatureExamples, max_windows: int | None = None) -> list[Window]:
    """The windows an explainer may show: the `explain` split only, top windows first."""
    order = {"top": 0, "quantile": 1, "random": 2}
    windows = sorted(
        (w for w in feature.split("explain") if w.tokens),
        key=lambda w: (order.get(w.kind, 3), -(w.quantile or 0), -w.max_act),
    )
    return windows if max_windows is None else windows[:max_windows]


def parse_explanation(resp: ChatResponse, max_chars: int = MAX_EXPLANATION_CHARS) -> str:
    """The explanation in a `{"explanation": "..."}` answer; UnparseableResponse for anything else:
    not JSON, no string `explanation`, empty, or longer than `max_chars`."""
    value = resp.json()
    if not isinstance(value, dict) or not isinstance(value.get("explanation"), str):
        raise UnparseableResponse('answer is not a JSON object with a string "explanation"')
    text = " ".join(value["explanation"].split())
    if not text:
        raise UnparseableResponse("the explanation is empty")
    if len(text) > max_chars:
        raise UnparseableResponse(f"the explanation is {len(text)} characters long (at most {max_chars})")
    return text


MAX_EXPLANATION_WORDS = 25

# a preamble a model may write before the phrase itself (the prefill already says it)
_PREAMBLE = re.compile(
    r"^(?:explanation\s*:\s*)?(?:(?:this|the) (?:feature|neuron|unit)\s+"
    r"(?:is active on|is active for|responds to|fires on|activates on|detects)\s*:?\s*)?",
    re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_COPIED_FORMAT = re.compile(r"<<|>>|\t|\bexcerpt\s*\d|^text\s*\d|active tokens\s*:", re.IGNORECASE)


def parse_text_explanation(resp: ChatResponse, max_chars: int = MAX_EXPLANATION_CHARS,
                           max_words: int = MAX_EXPLANATION_WORDS) -> str:
    """The phrase of a plain-text answer (the completion of "...the feature is active on"):
    its first line and first sentence, whitespace collapsed, without a preamble or enclosing
    quotes. UnparseableResponse when it is empty, cut off before the phrase ended, shorter than
    two words or longer than `max_words` / `max_chars`, or copies the prompt's format back."""
    text = (resp.text or "").strip()
    first_line = text.split("\n", 1)[0]
    end = _SENTENCE_END.search(first_line)
    if end is not None:
        phrase = first_line[:end.start()]
    elif resp.finish_reason == "length" and "\n" not in text:
        raise UnparseableResponse("the answer was cut off before its first sentence ended")
    else:
        phrase = first_line
    if _COPIED_FORMAT.search(phrase):
        raise UnparseableResponse("the answer copies the excerpts' format instead of explaining them")
    phrase = _PREAMBLE.sub("", " ".join(phrase.split())).strip(" :;,-")
    if len(phrase) >= 2 and phrase[0] == phrase[-1] and phrase[0] in "\"'`" and phrase.count(phrase[0]) == 2:
        phrase = phrase[1:-1].strip()
    if not phrase:
        raise UnparseableResponse("the explanation is empty")
    if _COPIED_FORMAT.search(phrase):
        raise UnparseableResponse("the answer copies the excerpts' format instead of explaining them")
    n_words = len(phrase.split())
    if n_words < 2:
        raise UnparseableResponse(f"the explanation {phrase!r} is a single word")
    if n_words > max_words or len(phrase) > max_chars:
        raise UnparseableResponse(f"the explanation is too long ({n_words} words, {len(phrase)} characters)")
    return phrase


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
