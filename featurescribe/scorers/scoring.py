"""Scoring explanations on held-out windows, with baselines beside every score.

`score_explanations` is the scorers' entry point. For each explanation it takes the feature's
windows of one split (`test` by default; `valid` when choosing among candidates), and runs each
scorer asked for (scorers/registry.py): simulation (correlation, scorers/simulation.py),
detection and fuzzing (balanced accuracy, scorers/classify.py), intervention (a judge picks the
steered of two continuations, scorers/intervention.py).

Baselines on the same windows sit beside every score: `baseline_shuffled`, the same simulator (or
judge) given another feature's explanation, and for simulation `baseline_tokens`, the
`baseline:tokens` simulator's correlation. An explanation the simulator or judge could not use
(the LLM layer gave up on it) is reported in `failures`, not scored.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from featurescribe.llm.base import gather_settled
from featurescribe.records import Explanation, FeatureExamples
from featurescribe.scorers import classify as cls
from featurescribe.scorers.context import ScoreFailure, ScoreOutcome, ScoringContext
from featurescribe.scorers.registry import SCORERS, default_judge, make_judge, make_simulator, parse_scorers
from featurescribe.scorers.simulation import Simulated, simulation_score
from featurescribe.scorers.simulators import Simulator, TokenMeanSimulator

__all__ = ["ScoreFailure", "ScoreOutcome", "Simulated", "score_explanations", "shuffled_partners",
           "simulation_score"]


def _feature_map(examples: Mapping[tuple[str, int], FeatureExamples] | Iterable[FeatureExamples]):
    if isinstance(examples, Mapping):
        return dict(examples)
    return {(fe.source_id, fe.feature_id): fe for fe in examples}


def rotate_by_feature(items: Sequence[Any], feature_of, pick) -> dict[Any, Any]:
    """Each item's partner among the items of the next feature (features in order, rotated by
    one): `pick(item, next_feature_items)`. Empty with fewer than two features. The shuffled
    explanation baselines of scoring and of the label pipeline both come from here."""
    by_feature: dict[Any, list[Any]] = {}
    for item in items:
        by_feature.setdefault(feature_of(item), []).append(item)
    keys = sorted(by_feature)
    if len(keys) < 2:
        return {}
    return {id(item): pick(item, by_feature[keys[(i + 1) % len(keys)]])
            for i, key in enumerate(keys) for item in by_feature[key]}


def shuffled_partners(explanations: Sequence[Explanation]) -> dict[str, Explanation]:
    """For each explanation, another feature's explanation (the next feature in order, preferring
    the same explainer), for the shuffled-explanation baseline. Empty when there is one feature."""
    def pick(e: Explanation, other: list[Explanation]) -> Explanation:
        same = [o for o in other if o.explainer == e.explainer] or other
        return same[min(e.candidate, len(same) - 1)]

    partners = rotate_by_feature(explanations, lambda e: (e.source_id, e.feature_id), pick)
    return {e.explanation_id: partners[id(e)] for e in explanations if id(e) in partners}


def _context(explanations, examples, names, *, simulator, client, judge, judge_client, split,
             other_explanations, baselines, batch_size, steering) -> ScoringContext:
    kinds = [SCORERS.get(n) for n in names]
    ctx = ScoringContext(_feature_map(examples), split, baselines=baselines, batch_size=batch_size,
                         token_simulator=TokenMeanSimulator())
    if any(k.uses_simulator for k in kinds):
        ctx.simulator = make_simulator(simulator, client=client)
    if judge is None:
        judge = default_judge(simulator)
        judge_client = judge_client or (client if judge != "lexical" else None)
    if any(k.uses_judge for k in kinds):
        ctx.judge = make_judge(judge, client=judge_client)
    if any(k.uses_steering for k in kinds):
        from featurescribe.scorers.intervention import make_pair_judge

        ctx.steering, ctx.pair_judge = steering, make_pair_judge(judge, client=judge_client)
    partners = shuffled_partners(explanations)
    ctx.others = {k: v.text for k, v in partners.items()}
    ctx.other_ids = {k: v.explanation_id for k, v in partners.items()}
    ctx.others.update(other_explanations or {})
    return ctx


async def score_explanations(
    explanations: Sequence[Explanation],
    examples: Mapping[tuple[str, int], FeatureExamples] | Iterable[FeatureExamples],
    *,
    simulator: str | Simulator = "lexical",
    client: Any = None,
    scorers: str | Sequence[str] = ("simulation",),
    judge: str | cls.Judge | None = None,
    judge_client: Any = None,
    split: str = "test",
    other_explanations: Mapping[str, str] | None = None,
    baselines: bool = True,
    batch_size: int = 8,
    steering: Any = None,
) -> ScoreOutcome:
    """Score every explanation on its feature's `split` windows with each scorer.

    `simulator`: a spec (`local:MODEL`, `openai:MODEL`, `anthropic:MODEL`, `lexical`,
    `baseline:tokens`) or a Simulator; `client` is the LLM client for an LLM spec. `judge` (with
    `judge_client`) is who answers detection and fuzzing, by default the simulator's backend
    (`lexical` for the no-LLM simulators). `other_explanations` maps an explanation_id to the
    text used for its shuffled baseline; by default another feature's explanation from the list.
    `steering` (a scorers.intervention.FeatureSteering) is what the intervention scorer steers.
    """
    names = parse_scorers(scorers)
    ctx = _context(explanations, examples, names, simulator=simulator, client=client, judge=judge,
                   judge_client=judge_client, split=split, other_explanations=other_explanations,
                   baselines=baselines, batch_size=batch_size, steering=steering)
    outcome = ScoreOutcome()
    done = await gather_settled(*(SCORERS.get(n).score(e, ctx) for e in explanations for n in names))
    for item in done:
        outcome.add(item)
    order = {e.explanation_id: i for i, e in enumerate(explanations)}
    rank = {n: i for i, n in enumerate(SCORERS.names())}
    outcome.results.sort(key=lambda r: (order.get(r.explanation_id, 0), rank[r.scorer]))
    return outcome
