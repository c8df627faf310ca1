"""Simulators: predict a feature's activation on every token of a window from an explanation.

All of them work a whole window at a time (one forward pass or one request per window, never
one per token), and return one float per token:

| spec                 | how                                                                     |
|----------------------|-------------------------------------------------------------------------|
| `local:MODEL`        | one forward pass over the prompt and the window's tokens, each followed |
|                      | by a tab and a placeholder; the expected value over the scale's digit   |
|                      | tokens is read at every placeholder (`client.candidate_probs`)          |
| `openai:MODEL`       | one request per `windows_per_call` windows: the model copies each token |
|                      | and writes its activation; the expected value comes from `top_logprobs` |
|                      | at each number                                                          |
| `anthropic:MODEL`,   | integer predictions as structured output (a JSON list per window, one   |
| models without       | number per token), lengths checked strictly, asked again when they do   |
| logprobs             | not line up; `windows_per_call` windows a request                       |
| `lexical`            | no LLM: 1 on the tokens the explanation quotes or names, else 0         |
| `baseline:tokens`    | no LLM, ignores the explanation: the feature's mean activation on each  |
|                      | token string in the `explain` split                                     |

The placeholder trick follows Bills et al. 2023: because the model is causal, the distribution
it puts on the token after `token<TAB>` depends only on what precedes it, so every slot of a
window can be read from one pass, with a neutral placeholder written in each earlier slot.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from featurescribe.llm.base import (
    CandidateNotOneToken,
    ChatRequest,
    ChatResponse,
    LLMCallFailed,
    UnparseableResponse,
    gather_settled,
)
from featurescribe.records import SCALE_MAX, FeatureExamples, Window
from featurescribe.scorers.lexical import LexicalRule
from featurescribe.prompts import render_messages, render_text, show_token


class SimulationFailed(Exception):
    """The simulator could not turn this explanation into predictions (e.g. every retry failed)."""


class Simulator:
    """Base class. Subclasses implement `simulate_window`; `simulate` runs the windows at once."""

    spec: str = ""
    uses_explanation: bool = True  # False for baselines that ignore it (baseline:tokens)
    needs_feature: bool = False  # True when predictions need the feature's explain split

    async def simulate_window(
        self, explanation: str, window: Window, feature: FeatureExamples | None = None
    ) -> list[float]:
        raise NotImplementedError

    async def simulate(
        self, explanation: str, windows: Sequence[Window], feature: FeatureExamples | None = None
    ) -> list[list[float]]:
        """One prediction list per window, each as long as the window. Raises SimulationFailed."""
        try:
            out = await self._simulate_all(explanation, windows, feature)
        except LLMCallFailed as err:
            raise SimulationFailed(f"{self.spec}: {err}") from err
        return self._checked(windows, out)

    async def _simulate_all(self, explanation, windows, feature) -> list[list[float]]:
        return await gather_settled(*(self.simulate_window(explanation, w, feature) for w in windows))

    def _checked(self, windows: Sequence[Window], out: Sequence[Sequence[float]]) -> list[list[float]]:
        for w, pred in zip(windows, out):
            if len(pred) != len(w.tokens):  # a bug, not a model error
                raise AssertionError(f"{self.spec} returned {len(pred)} values for {len(w.tokens)} tokens")
        return [list(map(float, p)) for p in out]

    async def aclose(self) -> None:
        pass


# ----------------------------------------------------------------------------- no-LLM simulators
class LexicalSimulator(Simulator):
    """1.0 on tokens the explanation quotes (or names as a class: digits, ...), 0.0 elsewhere."""

    spec = "lexical"

    def predict(self, explanation: str, tokens: list[str]) -> list[float]:
        return [1.0 if m else 0.0 for m in LexicalRule.from_explanation(explanation).mask(tokens)]

    async def simulate_window(self, explanation, window, feature=None):
        return self.predict(explanation, window.tokens)


class TokenMeanSimulator(Simulator):
    """The feature's mean activation on each token string over its `explain` windows.

    A token never seen there gets the mean over all explain tokens. It ignores the explanation:
    it is the lexical baseline a score is compared with, not a judge.
    """

    spec = "baseline:tokens"
    uses_explanation = False
    needs_feature = True

    def __init__(self) -> None:
        self._tables: dict[tuple[str, int], tuple[dict[str, float], float]] = {}

    def table(self, feature: FeatureExamples) -> tuple[dict[str, float], float]:
        key = (feature.source_id, feature.feature_id)
        if key not in self._tables:
            sums: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            total, n = 0.0, 0
            for w in feature.split("explain"):
                for tok, a in zip(w.tokens, w.acts):
                    sums[tok] += a
                    counts[tok] += 1
                    total += a
                    n += 1
            means = {t: sums[t] / counts[t] for t in sums}
            self._tables[key] = (means, total / n if n else 0.0)
        return self._tables[key]

    async def simulate_window(self, explanation, window, feature=None):
        if feature is None:
            raise ValueError("baseline:tokens needs the feature's explain split")
        means, default = self.table(feature)
        return [means.get(t, default) for t in window.tokens]


# ----------------------------------------------------------------------------- expected values
def expected_value(probs: dict[int, float]) -> float | None:
    """Σ v·p(v) / Σ p(v) over the scale values present; None when they carry no mass."""
    total = sum(probs.values())
    if total <= 0 or not math.isfinite(total):
        return None
    return sum(v * p for v, p in probs.items()) / total


def _scale_value(token: str) -> int | None:
    s = token.strip()
    if s.isdigit() and s.isascii():
        v = int(s)
        if 0 <= v <= SCALE_MAX:
            return v
    return None


# ----------------------------------------------------------------------------- local model
class LocalSimulator(Simulator):
    """All-at-once simulation with a local model: one forward pass per window.

    The text is the prompt (`simulate_local`: the scale, two worked examples, the explanation)
    followed by one line per window token: the token, a tab, and a placeholder slot. The client
    tokenizes the text in pieces cut at every slot (`candidate_probs`), so each slot starts a
    token and its distribution over the scale's digits is read from the logits just before it,
    for all slots in one pass. The candidates are the scale values that are single tokens of the
    model: 0..10, or 0..9 when "10" is two tokens (SmolLM2); the prompt then states a 0-9 scale.
    """

    SLOT = "unknown"

    def __init__(self, client: Any):
        self.client = client
        self.spec = client.spec
        self.scale_max = SCALE_MAX  # lowered to 9 once the model says "10" is not one token

    def build(self, explanation: str, tokens: list[str], scale_max: int | None = None) -> tuple[str, list[int]]:
        """(text, slot offsets): the prompt and one `token<TAB>slot` line per window token."""
        scale_max = self.scale_max if scale_max is None else scale_max
        head = render_text("simulate_local", explanation=" ".join(explanation.split()), scale_max=scale_max)
        parts = [head.rstrip("\n") + "\n"]
        size = len(parts[0])
        positions = []
        for tok in tokens:
            line = show_token(tok) + "\t"
            parts.append(line)
            size += len(line)
            positions.append(size)
            parts.append(self.SLOT + "\n")
            size += len(self.SLOT) + 1
        return "".join(parts), positions

    async def window_probs(self, text: str, positions: list[int], scale_max: int | None = None) -> np.ndarray:
        """Rows of probabilities over 0..scale_max at each slot (one forward pass)."""
        cands = [str(v) for v in range((self.scale_max if scale_max is None else scale_max) + 1)]
        return np.asarray(await self.client.candidate_probs(text, positions, cands), dtype=np.float64)

    def expected(self, probs: np.ndarray) -> list[float]:
        """Rows of candidate probabilities -> expected scale values Σ v·p(v) / Σ p(v)."""
        probs = np.asarray(probs, dtype=np.float64)
        values = np.arange(probs.shape[1], dtype=np.float64)
        mass = probs.sum(axis=1)
        ev = (probs * values).sum(axis=1) / np.where(mass > 0, mass, 1.0)
        return [float(x) for x in ev]

    async def simulate_window(self, explanation, window, feature=None):
        if not window.tokens:
            return []
        try:
            return await self._at_scale(explanation, window.tokens, self.scale_max)
        except CandidateNotOneToken as err:
            if err.candidate != str(SCALE_MAX):
                raise SimulationFailed(f"{self.spec}: {err}") from err
        except ValueError as err:
            raise SimulationFailed(f"{self.spec}: {err}") from err
        # "10" is two tokens for this model: the 0-9 scale it can write in one token
        self.scale_max = SCALE_MAX - 1
        try:
            return await self._at_scale(explanation, window.tokens, self.scale_max)
        except ValueError as err:
            raise SimulationFailed(f"{self.spec}: {err}") from err

    async def _at_scale(self, explanation: str, tokens: list[str], scale_max: int) -> list[float]:
        text, positions = self.build(explanation, tokens, scale_max)
        return self.expected(await self.window_probs(text, positions, scale_max))


# ----------------------------------------------------------------------------- API models
_FENCE = re.compile(r"^\s*```")
_TEXT_HEADER = re.compile(r"^\s*#+\s*text\s+\d+\s*:?\s*$", re.I)
_LINE = re.compile(r"^(?P<tok>.*?)(?:\t| {2,}|\t )\s*(?P<num>\d{1,2})\s*$")
_LINE_LOOSE = re.compile(r"^(?P<tok>.*?)\s+(?P<num>\d{1,2})\s*$")


def _answer_lines(text: str, skip_headers: bool = False) -> list[tuple[int, str]]:
    """(char offset, line) of the non-empty lines of an answer, code fences (and with
    `skip_headers` the `### text i` lines of a several-window answer) dropped."""
    out, offset = [], 0
    for line in text.split("\n"):
        if line.strip() and not _FENCE.match(line) and not (skip_headers and _TEXT_HEADER.match(line)):
            out.append((offset, line))
        offset += len(line) + 1
    return out


def parse_activation_lines(text: str, n: int, skip_headers: bool = False) -> list[tuple[int, int]]:
    """[(char offset of the number, the written integer)] for the n lines `token<TAB>n`.

    Raises UnparseableResponse unless there are exactly n lines each ending in an integer.
    """
    lines = _answer_lines(text, skip_headers)
    if len(lines) != n:
        raise UnparseableResponse(f"expected {n} lines of token and activation, got {len(lines)}")
    out = []
    for offset, line in lines:
        m = _LINE.match(line) or _LINE_LOOSE.match(line)
        if not m:
            raise UnparseableResponse(f"line without an activation: {line[:60]!r}")
        v = int(m.group("num"))
        if v > SCALE_MAX:
            raise UnparseableResponse(f"activation {v} is off the 0-{SCALE_MAX} scale")
        out.append((offset + m.start("num"), v))
    return out


def logprob_expected_values(resp: ChatResponse, numbers: list[tuple[int, int]]) -> list[float]:
    """At each written number, the expected scale value over its top_logprobs alternatives.

    The answer's logprob tokens are laid end to end to find the token holding each number; a
    number whose token cannot be found, or whose alternatives hold no scale value, keeps the
    integer written.
    """
    toks = resp.logprobs or []
    starts, pos = [], 0
    for t in toks:
        starts.append(pos)
        pos += len(t.token)
    aligned = "".join(t.token for t in toks) == resp.text
    out = []
    k = 0
    for offset, written in numbers:
        value = float(written)
        if aligned:
            while k + 1 < len(toks) and starts[k + 1] <= offset:
                k += 1
            if k < len(toks) and starts[k] <= offset < starts[k] + max(1, len(toks[k].token)):
                probs: dict[int, float] = defaultdict(float)
                alts = dict(toks[k].top) or {toks[k].token: toks[k].logprob}
                alts.setdefault(toks[k].token, toks[k].logprob)
                for alt, lp in alts.items():
                    v = _scale_value(alt)
                    if v is not None and lp is not None and math.isfinite(lp):
                        probs[v] += math.exp(lp)
                ev = expected_value(probs)
                if ev is not None:
                    value = ev
        out.append(value)
    return out


def _token_lines(tokens: list[str], numbered: bool) -> str:
    if numbered:
        return "\n".join(f"{i + 1}. {show_token(t)}" for i, t in enumerate(tokens))
    return "\n".join(show_token(t) for t in tokens)


ACTIVATIONS_SCHEMA = {
    "type": "object",
    "properties": {"activations": {"type": "array", "items": {"type": "integer"}}},
    "required": ["activations"],
    "additionalProperties": False,
}


def parse_activation_list(resp: ChatResponse, n: int) -> list[float]:
    """The `{"activations": [...]}` answer as n numbers on the scale; UnparseableResponse if not."""
    data = resp.json()
    return scale_values(data.get("activations") if isinstance(data, dict) else data, n)


def scale_values(acts: Any, n: int) -> list[float]:
    """A list of n numbers as values on the scale; UnparseableResponse if it is not one."""
    if not isinstance(acts, list):
        raise UnparseableResponse("answer has no list of activations")
    if len(acts) != n:
        raise UnparseableResponse(f"expected {n} activations, got {len(acts)}")
    out = []
    for a in acts:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise UnparseableResponse(f"activation {a!r} is not a number")
        out.append(float(min(SCALE_MAX, max(0, round(a)))))
    return out


MULTI_ACTIVATIONS_SCHEMA = {
    "type": "object",
    "properties": {"activations": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}},
    "required": ["activations"],
    "additionalProperties": False,
}


def _texts_block(windows: Sequence[Window], numbered: bool) -> str:
    """Several windows in one prompt, each after a `### text i` line."""
    return "\n".join(f"### text {i + 1}\n" + _token_lines(w.tokens, numbered) for i, w in enumerate(windows))


def split_by_lengths(values: Sequence[float], lengths: Sequence[int]) -> list[list[float]]:
    out, i = [], 0
    for n in lengths:
        out.append(list(values[i:i + n]))
        i += n
    return out


def parse_activation_lists(resp: ChatResponse, lengths: Sequence[int]) -> list[list[float]]:
    """The `{"activations": [[...], ...]}` answer of a several-window request, one list per
    window, each as long as its window; UnparseableResponse if not."""
    data = resp.json()
    lists = data.get("activations") if isinstance(data, dict) else data
    if not isinstance(lists, list) or len(lists) != len(lengths):
        raise UnparseableResponse(f"expected {len(lengths)} lists of activations")
    return [scale_values(acts, n) for acts, n in zip(lists, lengths)]


def _simulate_request(template: str, explanation: str, tokens: list[str], **kw) -> ChatRequest:
    """One window's simulation request; the structured template numbers the token lines."""
    messages = render_messages(template, explanation=explanation.strip(), n=len(tokens),
                               tokens=_token_lines(tokens, numbered=template == "simulate_json"))
    return ChatRequest(messages=messages, purpose="simulate", **kw)


class GroupedSimulator(Simulator):
    """An API simulator that sends `windows_per_call` windows in one request (1: one request per
    window, the single-window prompt). A group of one window always uses the single-window prompt.
    The score is the same: the same windows, the same predictions per token, fewer requests and
    the instructions paid once per group instead of once per window."""

    def __init__(self, client: Any, windows_per_call: int = 1):
        self.client = client
        self.spec = client.spec
        self.windows_per_call = max(1, int(windows_per_call))

    async def _simulate_all(self, explanation, windows, feature) -> list[list[float]]:
        k = self.windows_per_call
        groups = [list(windows[i:i + k]) for i in range(0, len(windows), k)]
        outs = await gather_settled(*(self._group(explanation, g, feature) for g in groups))
        return [pred for out in outs for pred in out]

    async def _group(self, explanation: str, group: list[Window], feature) -> list[list[float]]:
        if len(group) == 1 or any(not w.tokens for w in group):
            return [await self.simulate_window(explanation, w, feature) for w in group]
        return await self.simulate_group(explanation, group)

    async def simulate_group(self, explanation: str, group: list[Window]) -> list[list[float]]:
        raise NotImplementedError


class StructuredSimulator(GroupedSimulator):
    """Integer predictions as structured output (models without logprobs)."""

    async def simulate_window(self, explanation, window, feature=None):
        n = len(window.tokens)
        if n == 0:
            return []
        req = _simulate_request("simulate_json", explanation, window.tokens, max_tokens=16 + 4 * n,
                                json_schema=ACTIVATIONS_SCHEMA)
        return await self.client.chat(req, parse=lambda r: parse_activation_list(r, n))

    async def simulate_group(self, explanation, group):
        lengths = [len(w.tokens) for w in group]
        messages = render_messages("simulate_json_multi", explanation=explanation.strip(), k=len(group),
                                   counts=", ".join(map(str, lengths)), tokens=_texts_block(group, numbered=True))
        req = ChatRequest(messages=messages, purpose="simulate", max_tokens=16 + 4 * sum(lengths) + 4 * len(group),
                          json_schema=MULTI_ACTIVATIONS_SCHEMA)
        return await self.client.chat(req, parse=lambda r: parse_activation_lists(r, lengths))


class LogprobSimulator(GroupedSimulator):
    """OpenAI-style models with logprobs: the model writes `token<TAB>n` per token; the expected
    value is read from the top_logprobs at each number. Answers without logprobs switch this
    simulator to structured output (the model does not give them)."""

    TOP_LOGPROBS = 15

    def __init__(self, client: Any, windows_per_call: int = 1):
        super().__init__(client, windows_per_call)
        self._fallback: StructuredSimulator | None = None

    def _structured(self) -> StructuredSimulator:
        self._fallback = self._fallback or StructuredSimulator(self.client, self.windows_per_call)
        return self._fallback

    async def simulate_window(self, explanation, window, feature=None):
        if self._fallback is not None:
            return await self._fallback.simulate_window(explanation, window, feature)
        n = len(window.tokens)
        if n == 0:
            return []
        req = _simulate_request("simulate_logprobs", explanation, window.tokens,
                                max_tokens=64 + 12 * n + sum(len(t) for t in window.tokens),
                                top_logprobs=self.TOP_LOGPROBS)
        out = await self.client.chat(req, parse=lambda r: _logprob_values(r, n))
        if out is None:
            return await self._structured().simulate_window(explanation, window, feature)
        return out

    async def simulate_group(self, explanation, group):
        if self._fallback is not None:
            return await self._fallback.simulate_group(explanation, group)
        lengths = [len(w.tokens) for w in group]
        n = sum(lengths)
        messages = render_messages("simulate_logprobs_multi", explanation=explanation.strip(), k=len(group),
                                   n=n, tokens=_texts_block(group, numbered=False))
        req = ChatRequest(messages=messages, purpose="simulate", top_logprobs=self.TOP_LOGPROBS,
                          max_tokens=64 + 12 * n + sum(len(t) for w in group for t in w.tokens))
        out = await self.client.chat(req, parse=lambda r: _logprob_values(r, n, skip_headers=True))
        if out is None:
            return await self._structured().simulate_group(explanation, group)
        return split_by_lengths(out, lengths)


def _logprob_values(resp: ChatResponse, n: int, skip_headers: bool = False) -> list[float] | None:
    """The expected value at each of the n numbers written; None when the answer has no logprobs
    (the model gives none: structured output instead)."""
    numbers = parse_activation_lines(resp.text, n, skip_headers)
    if resp.logprobs is None:
        return None
    return logprob_expected_values(resp, numbers)
