"""The intruder scorer (Paulo et al.'s delphi defines it): is a feature interpretable at all?

The judge sees sets of windows. In each set, all windows but one are places where the feature is
active; the other (the intruder) is a window where it is silent, from the feature's random windows.
The judge says which window does not belong. The score is its accuracy over the sets (chance is
1 / set size). No explanation is needed, so it can run before a feature is explained: `label
--gate intruder:T` leaves the features whose accuracy is below T unlabelled (status 'gated') and
pays for no explanation or simulation of them.

As a scorer (`--scorers intruder`) it reads the scoring split's windows (its activating windows
are the members, its random ones the intruders) and ignores the explanation. As a gate it reads
the explain split's activating windows and the feature's random windows (valid and test).

Judges (scorers/classify.py): `LexicalJudge` (no LLM: the window lacking the most tokens that all
the others share), `LLMJudge` (structured answers, one request for all of a feature's sets),
`LocalJudge` (a local model: the likeliest number at each answer, one forward pass).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Sequence

from featurescribe.llm.base import LLMCallFailed
from featurescribe.records import Explanation, FeatureExamples, ScoreResult, Window, discretize
from featurescribe.scorers.context import ScoreFailure, ScoringContext

MEMBERS_PER_SET = 4  # activating windows per set, beside the one intruder
MAX_SETS = 5


@dataclass
class IntruderSet:
    """The windows of one set, in the order shown, and which one is the intruder."""

    windows: list[Window]
    intruder: int


@dataclass
class IntruderOutcome:
    accuracy: float
    picks: list[int]
    truth: list[int]
    judge: str

    @property
    def details(self) -> dict:
        n = len(self.truth)
        return {"accuracy": self.accuracy, "n_sets": n, "set_size": MEMBERS_PER_SET + 1,
                "chance": 1 / (MEMBERS_PER_SET + 1), "picks": self.picks, "intruders": self.truth,
                "judge": self.judge}


class IntruderFailed(Exception):
    """The judge gave no usable answer after the LLM layer's retries."""


def _activating(windows: Sequence[Window], max_act: float) -> list[Window]:
    return [w for w in windows if w.tokens and max(discretize(w.acts, max_act), default=0) >= 1]


def _silent_first(windows: Sequence[Window]) -> list[Window]:
    return sorted((w for w in windows if w.tokens), key=lambda w: (w.max_act, w.seq_id, w.start_pos))


def scoring_windows(fe: FeatureExamples, split: str) -> tuple[list[Window], list[Window]]:
    """(members, intruders) for the scorer: the split's activating and random windows."""
    windows = fe.split(split)
    members = _activating([w for w in windows if w.kind != "random"], fe.max_act)
    return members, _silent_first([w for w in windows if w.kind == "random"])


def gate_windows(fe: FeatureExamples) -> tuple[list[Window], list[Window]]:
    """(members, intruders) for the gate: the explain split's activating windows, and the
    feature's random windows from any split."""
    members = _activating([w for w in fe.split("explain") if w.kind != "random"], fe.max_act)
    return members, _silent_first([w for w in fe.windows if w.kind == "random"])


def build_sets(members: Sequence[Window], intruders: Sequence[Window], seed_key: tuple,
               k: int = MEMBERS_PER_SET, max_sets: int = MAX_SETS) -> list[IntruderSet]:
    """Up to `max_sets` sets of k members and one intruder at a seeded position. Members are
    dealt in turn (reused when there are fewer than k x sets), intruders silent ones first."""
    if len(members) < k or not intruders:
        return []
    rng = random.Random(zlib.crc32(repr(("intruder",) + tuple(seed_key)).encode()))
    sets = []
    for i in range(max_sets):
        group = [members[(i * k + j) % len(members)] for j in range(k)]
        pos = rng.randrange(k + 1)
        sets.append(IntruderSet(group[:pos] + [intruders[i % len(intruders)]] + group[pos:], pos))
    return sets


async def run_intruder(judge, sets: list[IntruderSet]) -> IntruderOutcome:
    """The judge's picks over the sets, and its accuracy."""
    try:
        picks = list(await judge.intruders(sets))
    except LLMCallFailed as err:
        raise IntruderFailed(f"{judge.spec}: {err}") from err
    truth = [s.intruder for s in sets]
    accuracy = sum(p == t for p, t in zip(picks, truth)) / len(sets)
    return IntruderOutcome(accuracy, picks, truth, judge.spec)


async def gate_feature(judge, fe: FeatureExamples) -> IntruderOutcome | None:
    """The gate's outcome for one feature (None when it has too few windows to build a set)."""
    sets = build_sets(*gate_windows(fe), (fe.source_id, fe.feature_id, "gate"))
    return await run_intruder(judge, sets) if sets else None


async def score_intruder(e: Explanation, ctx: ScoringContext) -> ScoreResult | ScoreFailure:
    """The intruder accuracy of the explanation's feature on the scoring split (the explanation
    is not read; every explanation of a feature gets the same value, computed once)."""
    judge = ctx.judge
    fe = ctx.features.get((e.source_id, e.feature_id))
    if fe is None:
        raise KeyError(f"no examples for feature {e.source_id}/{e.feature_id}")
    key = ("intruder", e.source_id, e.feature_id, ctx.split)
    if key not in ctx.cache:
        sets = build_sets(*scoring_windows(fe, ctx.split), (e.source_id, e.feature_id, ctx.split))
        if not sets:
            return ScoreFailure(e.explanation_id, "intruder", judge.spec,
                                f"too few {ctx.split} windows for a set of {MEMBERS_PER_SET} + 1")
        try:
            ctx.cache[key] = await run_intruder(judge, sets)
        except IntruderFailed as err:
            return ScoreFailure(e.explanation_id, "intruder", judge.spec, str(err))
    out: IntruderOutcome = ctx.cache[key]
    return ScoreResult(explanation_id=e.explanation_id, scorer="intruder", value=out.accuracy,
                       simulator=judge.spec, n_examples=len(out.truth), split=ctx.split, details=out.details)
