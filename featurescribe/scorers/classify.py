"""Detection and fuzzing (Paulo et al. 2024): a judge classifies windows against an explanation.

- Detection: the judge sees the explanation and a batch of held-out windows, activating and
  silent ones mixed, and says which windows the feature is active in.
- Fuzzing: the judge sees windows with some tokens marked. Every activating window is shown
  twice, once with its activating tokens marked and once with as many tokens marked at random
  among its silent ones; silent windows are shown with random marks. The judge says which
  markings fit the explanation.

Both report balanced accuracy (the mean of the true-positive and true-negative rates), so the
mix of classes does not move the score. A token is "activating" when it is at least 1 on the
0-10 scale shown to LLMs (`records.discretize`, max over the windows scored). Several windows go
into one request (`batch_size`), which makes both cheaper per feature than simulation.

Judges: `LexicalJudge` (no LLM: the explanation's quoted tokens, as the `lexical` simulator
reads them), `LLMJudge` (any chat model, structured output, strict length check) and
`LocalJudge` (a local model: P("1") against P("0") at each answer, one forward pass a batch).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from featurescribe.llm.base import ChatRequest, ChatResponse, LLMCallFailed, UnparseableResponse, gather_settled
from featurescribe.records import Explanation, ScoreResult, Window, discretize
from featurescribe.scorers.context import ScoreFailure, ScoringContext
from featurescribe.scorers.lexical import LexicalRule
from featurescribe.scorers.metrics import balanced_accuracy
from featurescribe.prompts import render_messages, show_token

HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE = "<<", ">>"


@dataclass
class Sample:
    """One window as a judge sees it, and the right answer."""

    window: Window
    truth: bool  # detection: the feature is active; fuzzing: the marks are the activating tokens
    marked: list[int] = field(default_factory=list)  # fuzzing: the marked token positions

    def text(self) -> str:
        marks = set(self.marked)
        out, open_ = [], False
        for i, tok in enumerate(self.window.tokens):
            if i in marks and not open_:
                out.append(HIGHLIGHT_OPEN)
                open_ = True
            elif i not in marks and open_:
                out.append(HIGHLIGHT_CLOSE)
                open_ = False
            out.append(show_token(tok))
        if open_:
            out.append(HIGHLIGHT_CLOSE)
        return "".join(out)


class ClassifyFailed(Exception):
    """The judge gave no usable answer for a batch after the LLM layer's retries."""


def active_positions(window: Window, max_act: float) -> list[int]:
    return [i for i, v in enumerate(discretize(window.acts, max_act)) if v >= 1]


def _rng(*key: Any) -> random.Random:
    return random.Random(zlib.crc32(repr(key).encode()))


def detection_samples(windows: Sequence[Window], max_act: float) -> list[Sample]:
    return [Sample(w, truth=bool(active_positions(w, max_act))) for w in windows]


def fuzzing_samples(windows: Sequence[Window], max_act: float, rng: random.Random) -> list[Sample]:
    samples: list[Sample] = []
    counts = []
    silent = []
    for w in windows:
        act = active_positions(w, max_act)
        if not act:
            silent.append(w)
            continue
        counts.append(len(act))
        samples.append(Sample(w, truth=True, marked=act))
        others = [i for i in range(len(w.tokens)) if i not in set(act)]
        if others:
            samples.append(Sample(w, truth=False, marked=sorted(rng.sample(others, min(len(act), len(others))))))
    for w in silent:
        if not w.tokens:
            continue
        k = min(len(w.tokens), rng.choice(counts) if counts else 1)
        samples.append(Sample(w, truth=False, marked=sorted(rng.sample(range(len(w.tokens)), k))))
    return samples


def batches(samples: list[Sample], size: int, rng: random.Random) -> list[list[Sample]]:
    """Shuffle, then cut into batches of `size`, keeping a window's two fuzzing versions apart
    when the batches allow it."""
    order = samples[:]
    rng.shuffle(order)
    n_batches = max(1, math.ceil(len(order) / size))
    out: list[list[Sample]] = [[] for _ in range(n_batches)]
    for s in order:
        key = (s.window.seq_id, s.window.start_pos)
        free = [b for b in out if len(b) < size]
        clean = [b for b in free if all((o.window.seq_id, o.window.start_pos) != key for o in b)]
        (clean or free)[0].append(s)
    return [b for b in out if b]


# ----------------------------------------------------------------------------- judges
class Judge:
    spec: str = ""

    async def judge(self, task: str, explanation: str, batch: list[Sample]) -> list[bool]:
        raise NotImplementedError

    async def intruders(self, sets: Sequence[Any]) -> list[int]:
        """The intruder scorer: for each set (scorers/intruder.py IntruderSet), the index of
        the window that does not belong."""
        raise NotImplementedError


class LexicalJudge(Judge):
    """Detection: a window matches when it holds a token the explanation quotes or names.
    Fuzzing: the marks fit when at least half of the marked tokens match."""

    spec = "lexical"

    async def judge(self, task, explanation, batch):
        rule = LexicalRule.from_explanation(explanation)
        out = []
        for s in batch:
            mask = rule.mask(s.window.tokens)
            if task == "detection":
                out.append(any(mask))
            else:
                hits = sum(mask[i] for i in s.marked)
                out.append(bool(s.marked) and hits * 2 >= len(s.marked))
        return out

    async def intruders(self, sets):
        """The window lacking the most tokens that every other window of the set holds (ties:
        the one sharing the fewest tokens with the others)."""
        return [_odd_one_out([{t.strip().lower() for t in w.tokens if t.strip()} for w in s.windows])
                for s in sets]


def _odd_one_out(token_sets: list[set[str]]) -> int:
    def lacks(i: int) -> tuple[int, float]:
        others = [t for j, t in enumerate(token_sets) if j != i]
        common = set.intersection(*others) if others else set()
        shared = sum(len(token_sets[i] & t) / max(1, len(token_sets[i] | t)) for t in others)
        return len(common - token_sets[i]), -shared

    return max(range(len(token_sets)), key=lambda i: (lacks(i), -i))


ANSWERS_SCHEMA = {
    "type": "object",
    "properties": {"answers": {"type": "array", "items": {"type": "integer"}}},
    "required": ["answers"],
    "additionalProperties": False,
}


def parse_answers(resp: ChatResponse, n: int) -> list[bool]:
    data = resp.json()
    answers = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(answers, list) or len(answers) != n:
        got = len(answers) if isinstance(answers, list) else "no list"
        raise UnparseableResponse(f"expected {n} answers, got {got}")
    out = []
    for a in answers:
        if isinstance(a, bool) or (isinstance(a, int) and a in (0, 1)):
            out.append(bool(a))
        else:
            raise UnparseableResponse(f"answer {a!r} is not 0 or 1")
    return out


def intruder_messages(style: str, sets: Sequence[Any]) -> tuple[dict, ...]:
    """The intruder judge's prompt (`intruder_batch`, `intruder_local`) for numbered sets."""
    blocks = []
    for i, s in enumerate(sets):
        texts = "\n".join(f"Text {j + 1}: {''.join(show_token(t) for t in w.tokens)}"
                          for j, w in enumerate(s.windows))
        blocks.append(f"Set {i + 1}:\n{texts}")
    k = len(sets[0].windows) if sets else 0
    return render_messages(f"intruder_{style}", sets="\n\n".join(blocks), n=len(sets), k=k)


def parse_picks(resp: ChatResponse, n: int, k: int) -> list[int]:
    """The intruder judge's answers: n numbers from 1 to k, as 0-based indices."""
    data = resp.json()
    answers = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(answers, list) or len(answers) != n:
        raise UnparseableResponse(f"expected {n} answers, got {len(answers) if isinstance(answers, list) else 'no list'}")
    if not all(isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= k for a in answers):
        raise UnparseableResponse(f"answers must be numbers from 1 to {k}")
    return [a - 1 for a in answers]


def judge_messages(task: str, style: str, explanation: str, batch: list[Sample]) -> tuple[dict, ...]:
    """The judge's prompt (`detect_batch`, `fuzz_local`, ...) for a batch of numbered texts."""
    name = ("detect_" if task == "detection" else "fuzz_") + style
    examples = "\n".join(f"Text {i + 1}: {s.text()}" for i, s in enumerate(batch))
    return render_messages(name, explanation=explanation.strip(), n=len(batch), examples=examples)


class LLMJudge(Judge):
    def __init__(self, client: Any):
        self.client = client
        self.spec = client.spec

    async def judge(self, task, explanation, batch):
        req = ChatRequest(
            messages=judge_messages(task, "batch", explanation, batch),
            purpose="detect" if task == "detection" else "fuzz",
            max_tokens=32 + 4 * len(batch),
            json_schema=ANSWERS_SCHEMA,
        )
        return await self.client.chat(req, parse=lambda r: parse_answers(r, len(batch)))

    async def intruders(self, sets):
        k = len(sets[0].windows)
        req = ChatRequest(messages=intruder_messages("batch", sets), purpose="intruder",
                          max_tokens=32 + 4 * len(sets), json_schema=ANSWERS_SCHEMA)
        return await self.client.chat(req, parse=lambda r: parse_picks(r, len(sets), k))


class LocalJudge(Judge):
    """A local model judges a whole batch in one forward pass, without generating: the answer is
    written as lines `i: <slot>`, and at each slot the probabilities of "1" and "0" are read
    (`client.candidate_probs`); the window counts as a yes when "1" is the likelier. Nothing
    to parse, so a small model cannot fail the format."""

    SLOT = "?"

    def __init__(self, client: Any):
        self.client = client
        self.spec = client.spec

    async def judge(self, task, explanation, batch):
        messages = judge_messages(task, "local", explanation, batch)
        text, positions = self._slots(len(batch))
        probs = await self.client.candidate_probs(text, positions, ["0", "1"], messages=messages,
                                                  purpose="detect" if task == "detection" else "fuzz")
        return [bool(row[1] > row[0]) for row in probs]

    async def intruders(self, sets):
        text, positions = self._slots(len(sets))
        k = len(sets[0].windows)
        probs = await self.client.candidate_probs(text, positions, [str(i + 1) for i in range(k)],
                                                  messages=intruder_messages("local", sets), purpose="intruder")
        return [max(range(k), key=lambda i: (row[i], -i)) for row in probs]

    def _slots(self, n: int) -> tuple[str, list[int]]:
        """The answer lines `i: <slot>` and where each slot starts."""
        text, positions = "", []
        for i in range(n):
            text += f"{i + 1}: "
            positions.append(len(text))
            text += self.SLOT + "\n"
        return text, positions


# ----------------------------------------------------------------------------- scoring
@dataclass
class ClassifyOutcome:
    value: float
    n_examples: int
    details: dict


async def classify(
    task: str,
    judge: Judge,
    explanation: str,
    samples: list[Sample],
    batch_list: list[list[Sample]],
) -> ClassifyOutcome:
    """Run the judge over prepared batches; balanced accuracy of its answers."""
    try:
        answers = await gather_settled(*(judge.judge(task, explanation, b) for b in batch_list))
    except LLMCallFailed as err:
        raise ClassifyFailed(f"{judge.spec}: {err}") from err
    truth, pred = [], []
    for b, a in zip(batch_list, answers):
        truth += [s.truth for s in b]
        pred += list(a)
    value, counts = balanced_accuracy(truth, pred)
    details = {
        "balanced_accuracy": value,
        **counts,
        "n_positive": sum(truth),
        "n_negative": len(truth) - sum(truth),
        "n_requests": len(batch_list),
        "batch_size": max((len(b) for b in batch_list), default=0),
        "judge": judge.spec,
        "records": _records(batch_list, pred),
    }
    return ClassifyOutcome(value=value, n_examples=len(truth), details=details)


def _records(batch_list: list[list[Sample]], pred: list[bool]) -> list[dict]:
    """One record per judged window, in the order judged: what delphi's score files hold (the
    delphi export reads the window's tokens and activations from `examples` by seq_id and start)."""
    samples = [s for b in batch_list for s in b]
    return [{"seq_id": s.window.seq_id, "start_pos": s.window.start_pos, "activating": bool(s.truth),
             "prediction": bool(p)} for s, p in zip(samples, pred)]


def prepare(task: str, windows: Sequence[Window], max_act: float, batch_size: int, seed_key: tuple):
    """The samples and batches of one feature for a task, the same for every explanation of it."""
    rng = _rng(task, *seed_key)
    if task == "detection":
        samples = detection_samples(windows, max_act)
    elif task == "fuzzing":
        samples = fuzzing_samples(windows, max_act, rng)
    else:
        raise ValueError(f"unknown classification task {task!r}")
    return samples, batches(samples, batch_size, rng)


# ----------------------------------------------------------------------------- the scorers
def _window_max(windows: Sequence[Window], fe) -> float:
    m = max((w.max_act for w in windows), default=0.0)
    return m if m > 0 else fe.max_act


def _prepared(task: str, e: Explanation, ctx: ScoringContext):
    """The feature's samples and batches for `task`, made once for all its explanations."""
    fe, windows = ctx.windows_of(e)
    key = (task, e.source_id, e.feature_id)
    if key not in ctx.cache:
        ctx.cache[key] = prepare(task, windows, _window_max(windows, fe), ctx.batch_size,
                                 (e.source_id, e.feature_id, ctx.split))
    return ctx.cache[key]


async def score_classification(task: str, e: Explanation, ctx: ScoringContext) -> ScoreResult | ScoreFailure:
    """Detection or fuzzing of one explanation: balanced accuracy, beside the shuffled baseline."""
    judge = ctx.judge
    samples, batch_list = _prepared(task, e, ctx)
    if not samples:
        return ScoreFailure(e.explanation_id, task, judge.spec, f"no {ctx.split} windows")
    try:
        out = await classify(task, judge, e.text, samples, batch_list)
    except ClassifyFailed as err:
        return ScoreFailure(e.explanation_id, task, judge.spec, str(err))
    res = ScoreResult(explanation_id=e.explanation_id, scorer=task, value=out.value, simulator=judge.spec,
                      n_examples=out.n_examples, split=ctx.split, details=out.details)
    other = ctx.baseline_text(e)
    if other is not None:
        try:
            base = await classify(task, judge, other, samples, batch_list)
            res.baseline_shuffled = base.value
            res.details["baseline_shuffled"] = ctx.baseline_note(e, other)
        except ClassifyFailed as err:
            res.details["baseline_shuffled"] = {"error": str(err)}
    return res


async def score_detection(e: Explanation, ctx: ScoringContext) -> ScoreResult | ScoreFailure:
    return await score_classification("detection", e, ctx)


async def score_fuzzing(e: Explanation, ctx: ScoringContext) -> ScoreResult | ScoreFailure:
    return await score_classification("fuzzing", e, ctx)
