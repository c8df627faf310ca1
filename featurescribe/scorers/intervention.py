"""The intervention scorer: does the explanation say what the feature *does* to the output?

For each feature (once, shared by all its explanations): the steering strength is calibrated so
that the next-token distribution over N neutral prompts moves by a target KL from the unsteered
one (steer/calibrate.py); then each prompt is continued twice, unsteered and steered at that
strength (greedy, one batch). A judge sees the explanation and, per prompt, the two continuations
as A and B in an order fixed by a hash of (source, feature, prompt), and says which one the
explanation describes. Score = accuracy (a tie, which only the lexical judge gives, counts half).
The shuffled-explanation baseline is the same judge on the same pairs with another feature's
explanation, so lift = score - baseline as for every scorer. Each pair is an audit row
(`interventions`: prompt, strength, KL, both continuations, order, pick), so a score can be
recomputed; every forward pass is a ledger row (`llm_calls`, backend local, purpose
`intervention`, cost 0).

Judges: `lexical` (no LLM: the continuation with more tokens the explanation quotes or names
wins; with nothing quoted, its content words), any chat model through the LLM layer (structured
output, one request per feature), and a local model (P("A") against P("B") at each answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from featurescribe.llm.base import ChatRequest, ChatResponse, LLMCallFailed, UnparseableResponse
from featurescribe.records import Explanation, ScoreResult
from featurescribe.scorers.context import ScoreFailure, ScoringContext
from featurescribe.scorers.lexical import LexicalRule
from featurescribe.prompts import render_messages, show_token
from featurescribe.steer.calibrate import DEFAULT_TARGET_KL, Calibration, calibrate, neutral_prompts
from featurescribe.steer.hooks import HookPoint, Intervention

SCORER = "intervention"
DEFAULT_PROMPTS = 8
DEFAULT_NEW_TOKENS = 12


@dataclass(frozen=True)
class InterventionConfig:
    n_prompts: int = DEFAULT_PROMPTS
    target_kl: float = DEFAULT_TARGET_KL
    max_new_tokens: int = DEFAULT_NEW_TOKENS


@dataclass
class InterventionRecord:
    """One prompt's pair as the judge saw it (a row of `interventions`)."""

    prompt_index: int
    prompt: str
    strength: float
    kl: float
    steered: str
    unsteered: str
    steered_first: bool
    picked: str  # 'A' | 'B' | 'tie'
    correct: float  # 1, 0, or 0.5 for a tie
    role: str = "explanation"  # 'explanation' | 'shuffled'


@dataclass
class Continuations:
    prompts: list[str]
    steered: list[str]
    unsteered: list[str]
    steered_first: list[bool]
    calibration: Calibration
    forward_passes: int
    details: dict = field(default_factory=dict)


class InterventionFailed(Exception):
    """The judge gave no usable answer, or the feature could not be steered."""


# ----------------------------------------------------------------------------- steering
class FeatureSteering:
    """Steers the features of one model at one hook point; continuations memoized per feature.

    `local` is the process's LocalModel (model, tokenizer, lock, single-thread executor), so the
    work runs off the event loop and never beside another forward pass of the same model.
    `intervention_for(feature_id)` says how to steer a feature; `on_pass(feature_id, tokens_in,
    tokens_out, seconds)` is told of every forward pass (the ledger).
    """

    def __init__(self, local, point: HookPoint, intervention_for: Callable[[int], Intervention],
                 config: InterventionConfig = InterventionConfig(), *, key: str = "",
                 on_pass: Callable[..., None] | None = None):
        from featurescribe.steer.generate import Steerer

        self.local, self.point, self.config, self.key = local, point, config, key
        self.intervention_for = intervention_for
        self.steerer = Steerer(local.model, local.tokenizer, point)
        self.on_pass = on_pass
        self._memo: dict[int, asyncio.Future] = {}

    async def continuations(self, feature_id: int) -> Continuations:
        fut = self._memo.get(feature_id)
        if fut is None:
            fut = self._memo[feature_id] = asyncio.ensure_future(
                self.local.run(self._compute, feature_id))
        return await fut

    def _compute(self, feature_id: int) -> Continuations:
        iv = self.intervention_for(feature_id)
        prompts = neutral_prompts(self.config.n_prompts)
        with self.local.lock:
            before = self.steerer.stats.forward_passes
            self.steerer.on_pass = (lambda *a: self.on_pass(feature_id, *a)) if self.on_pass else None
            try:
                cal = calibrate(self.steerer, prompts, iv, self.config.target_kl)
                n = len(prompts)
                texts = self.steerer.generate(prompts * 2, iv, [None] * n + [cal.strength] * n,
                                              max_new_tokens=self.config.max_new_tokens)
            finally:
                self.steerer.on_pass = None
            passes = self.steerer.stats.forward_passes - before
        order = [_steered_first(self.key, feature_id, i) for i in range(n)]
        return Continuations(prompts, texts[n:], texts[:n], order, cal, passes,
                             {"mode": iv.mode, "scale": iv.scale, "hook": self.point.name})


def _steered_first(key: str, feature_id: int, index: int) -> bool:
    return zlib.crc32(f"{key}|{feature_id}|{index}".encode()) % 2 == 0


# ----------------------------------------------------------------------------- judges
_WORD = re.compile(r"[A-Za-z]{4,}")
_STOP = frozenset("that this with from into about which their there these those when what where "
                  "word words token tokens text feature fires like such also other more most".split())


def lexical_hits(explanation: str, text: str) -> int:
    """How many tokens of `text` the explanation quotes or names (its content words when it
    quotes nothing and names no class)."""
    from featurescribe.testbed.planted import word_tokenize

    rule = LexicalRule.from_explanation(explanation)
    tokens = word_tokenize(text)
    if not rule.empty:
        return sum(rule.mask(tokens))
    wanted = {w.lower() for w in _WORD.findall(explanation)} - _STOP
    return sum(1 for w in _WORD.findall(text) if w.lower() in wanted)


class PairJudge:
    spec: str = ""

    async def pick(self, explanation: str, pairs: Sequence[tuple[str, str, str]]) -> list[str]:
        """For each (prompt, A, B): 'A', 'B' or 'tie'."""
        raise NotImplementedError


class LexicalPairJudge(PairJudge):
    spec = "lexical"

    async def pick(self, explanation, pairs):
        out = []
        for _, a, b in pairs:
            ha, hb = lexical_hits(explanation, a), lexical_hits(explanation, b)
            out.append("A" if ha > hb else "B" if hb > ha else "tie")
        return out


def _pairs_text(pairs: Sequence[tuple[str, str, str]]) -> str:
    return "\n\n".join(f"Pair {i + 1}: starting text: {show_token(p)}\n  A: {show_token(a)}\n  B: {show_token(b)}"
                       for i, (p, a, b) in enumerate(pairs))


ANSWERS_SCHEMA = {
    "type": "object",
    "properties": {"answers": {"type": "array", "items": {"type": "string", "enum": ["A", "B"]}}},
    "required": ["answers"],
    "additionalProperties": False,
}


def parse_letters(resp: ChatResponse, n: int) -> list[str]:
    data = resp.json()
    answers = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(answers, list) or len(answers) != n:
        got = len(answers) if isinstance(answers, list) else "no list"
        raise UnparseableResponse(f"expected {n} answers, got {got}")
    out = [str(a).strip().upper() for a in answers]
    bad = [a for a in out if a not in ("A", "B")]
    if bad:
        raise UnparseableResponse(f"answer {bad[0]!r} is not A or B")
    return out


class LLMPairJudge(PairJudge):
    def __init__(self, client: Any):
        self.client, self.spec = client, client.spec

    async def pick(self, explanation, pairs):
        req = ChatRequest(
            messages=render_messages("intervention_batch", explanation=explanation.strip(), n=len(pairs),
                                     pairs=_pairs_text(pairs)),
            purpose="intervention", max_tokens=32 + 6 * len(pairs), json_schema=ANSWERS_SCHEMA)
        return await self.client.chat(req, parse=lambda r: parse_letters(r, len(pairs)))


class LocalPairJudge(PairJudge):
    """A local model answers every pair in one forward pass: P("A") against P("B") at each slot."""

    def __init__(self, client: Any):
        self.client, self.spec = client, client.spec

    async def pick(self, explanation, pairs):
        messages = render_messages("intervention_local", explanation=explanation.strip(), n=len(pairs),
                                   pairs=_pairs_text(pairs))
        text, positions = "", []
        for i in range(len(pairs)):
            text += f"{i + 1}: "
            positions.append(len(text))
            text += "A\n"
        probs = await self.client.candidate_probs(text, positions, ["A", "B"], messages=messages,
                                                  purpose="intervention")
        return ["A" if row[0] > row[1] else "B" if row[1] > row[0] else "tie" for row in probs]


def make_pair_judge(spec: str | PairJudge, client: Any = None) -> PairJudge:
    if isinstance(spec, PairJudge):
        return spec
    if not isinstance(spec, str):  # a detection/fuzzing Judge: the same backend judges pairs
        client = client or getattr(spec, "client", None)
        spec = spec.spec
    if spec == "lexical" or spec.startswith("baseline"):
        return LexicalPairJudge()
    if client is None:
        from featurescribe.llm import make_client

        client = make_client(spec)
    if getattr(client, "supports_candidate_probs", False):
        return LocalPairJudge(client)
    return LLMPairJudge(client)


# ----------------------------------------------------------------------------- scoring
async def judge_pairs(judge: PairJudge, explanation: str, cont: Continuations,
                      role: str = "explanation") -> list[InterventionRecord]:
    pairs = []
    for p, s, u, first in zip(cont.prompts, cont.steered, cont.unsteered, cont.steered_first):
        pairs.append((p, s, u) if first else (p, u, s))
    try:
        picks = await judge.pick(explanation, pairs)
    except LLMCallFailed as err:
        raise InterventionFailed(f"{judge.spec}: {err}") from err
    cal = cont.calibration
    out = []
    for i, (pick, first) in enumerate(zip(picks, cont.steered_first)):
        correct = 0.5 if pick == "tie" else float((pick == "A") == first)
        out.append(InterventionRecord(i, cont.prompts[i], cal.strength, cal.kl, cont.steered[i],
                                      cont.unsteered[i], first, pick, correct, role))
    return out


def accuracy(records: Sequence[InterventionRecord]) -> float:
    return sum(r.correct for r in records) / len(records) if records else 0.0


async def score_intervention(e: Explanation, steering: FeatureSteering, judge: PairJudge, *,
                             other: str | None = None, other_id: str | None = None,
                             split: str = "test") -> ScoreResult:
    """The intervention score of one explanation, with its shuffled baseline when `other` is given."""
    cont = await steering.continuations(e.feature_id)
    records = await judge_pairs(judge, e.text, cont)
    details = {"method": "judge picks the steered of two continuations (accuracy; ties count half)",
               "judge": judge.spec, "n_prompts": len(records), "max_new_tokens": steering.config.max_new_tokens,
               "calibration": cont.calibration.as_dict(), "forward_passes": cont.forward_passes,
               "n_ties": sum(r.picked == "tie" for r in records), **cont.details}
    res = ScoreResult(explanation_id=e.explanation_id, scorer=SCORER, value=accuracy(records),
                      simulator=judge.spec, n_examples=len(records), split=split, details=details)
    if other is not None:
        try:
            base = await judge_pairs(judge, other, cont, role="shuffled")
            res.baseline_shuffled = accuracy(base)
            res.details["baseline_shuffled"] = {"explanation_id": other_id, "text": other}
            records += base
        except InterventionFailed as err:
            res.details["baseline_shuffled"] = {"error": str(err)}
    res.interventions = records
    return res


async def score_intervention_in_context(e: Explanation, ctx: ScoringContext) -> ScoreResult | ScoreFailure:
    """The registered scorer: the context's steering and pair judge, its shuffled baseline."""
    judge = ctx.pair_judge
    if ctx.steering is None:
        return ScoreFailure(e.explanation_id, SCORER, judge.spec,
                            "no model to steer (the intervention scorer needs the source)")
    try:
        return await score_intervention(e, ctx.steering, judge, other=ctx.baseline_text(e),
                                        other_id=ctx.other_ids.get(e.explanation_id), split=ctx.split)
    except InterventionFailed as err:
        return ScoreFailure(e.explanation_id, SCORER, judge.spec, str(err))


def ledger_hook(store, run_id: str | None, model: str, key: str, purpose: str = SCORER):
    """An `on_pass` that writes one `llm_calls` row per forward pass (backend local, cost 0)."""
    if store is None:
        return None
    from featurescribe.store.llm_calls import CallRow

    def record(feature_id: int, tokens_in: int, tokens_out: int, seconds: float) -> None:
        h = hashlib.sha256(f"{key}|{feature_id}|{purpose}".encode()).hexdigest()
        store.record(CallRow(backend="local", model=model, prompt_hash=h, status="ok", purpose=purpose,
                             run_id=run_id, input_tokens=tokens_in, output_tokens=tokens_out,
                             cost_usd=0.0, latency_s=seconds))

    return record


def steering_for_source(source: dict, max_acts: dict[int, float | None],
                        config: InterventionConfig = InterventionConfig(), *, store=None,
                        run_id: str | None = None, device: str = "auto") -> FeatureSteering:
    """A FeatureSteering over the features of a `sources` row (its model loaded once per process);
    `max_acts` gives each feature's max activation (the unit of strength)."""
    from featurescribe.steer.source import load_source_steering

    st = load_source_steering(source, device=device)
    hook = ledger_hook(store, run_id, str(source["model_id"]), str(source["source_id"]))
    return FeatureSteering(st.local, st.point, lambda f: st.intervention(f, max_acts.get(f)), config,
                           key=str(source["source_id"]), on_pass=hook)
