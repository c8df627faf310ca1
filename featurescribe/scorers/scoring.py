"""Scoring explanations on held-out windows: simulation, detection and fuzzing, with baselines.

`score_explanations` is the scorers' entry point. For each explanation it takes the feature's
windows of one split (`test` by default; `valid` when choosing among candidates), and returns a
`ScoreResult` per scorer:

- simulation: Pearson correlation between the true raw activations and the simulator's
  predictions over every window of the split concatenated (top, quantile and random alike), as
  Bills et al.'s `ev_correlation_score`. `details.per_kind` holds the same correlation over each
  kind's windows alone. Each window's arrays go to `ScoreResult.simulations`, so the score can
  be recomputed from the `simulations` table. A constant true or predicted array scores 0 with
  `details.flag`; never NaN.
- detection, fuzzing: balanced accuracy of a judge (see classify.py).

Baselines on the same windows sit beside every score: `baseline_shuffled`, the same simulator (or
judge) given another feature's explanation, and for simulation `baseline_tokens`, the
`baseline:tokens` simulator's correlation. An explanation the simulator or judge could not use
(the LLM layer gave up on it) is reported in `failures`, not scored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from featurescribe.records import KINDS, Explanation, FeatureExamples, ScoreResult, SimulationRecord, Window
from featurescribe.scorers import classify as cls
from featurescribe.scorers.embedding import NoWindows, make_embedding_scorer
from featurescribe.scorers.metrics import correlation
from featurescribe.scorers.simulators import (
    SimulationFailed,
    Simulator,
    TokenMeanSimulator,
    make_simulator,
)

SCORERS = ("simulation", "detection", "fuzzing", "embedding")


@dataclass
class ScoreFailure:
    explanation_id: str
    scorer: str
    judge: str | None
    error: str


class ScoreResults(list):
    """A list of ScoreResult, with `failures`: the explanations that could not be scored."""

    def __init__(self, results: Iterable[ScoreResult] = (), failures: Iterable[ScoreFailure] = ()):
        super().__init__(results)
        self.failures: list[ScoreFailure] = list(failures)


def parse_scorers(text: str | Sequence[str] | None) -> list[str]:
    """'simulation,detection' -> ['simulation', 'detection']; an unknown name is a ValueError."""
    if text is None:
        return ["simulation"]
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if n not in SCORERS]
    if bad:
        raise ValueError(f"unknown scorer(s) {', '.join(bad)}: use {', '.join(SCORERS)}")
    return list(dict.fromkeys(names)) or ["simulation"]


# ----------------------------------------------------------------------------- simulation
@dataclass
class Simulated:
    value: float
    details: dict
    records: list[SimulationRecord]


def simulation_score(windows: Sequence[Window], predicted: Sequence[Sequence[float]]) -> Simulated:
    """The score from windows and predictions, with per-kind breakdowns and records."""
    records = [
        SimulationRecord(seq_id=w.seq_id, start_pos=w.start_pos, split=w.split, kind=w.kind,
                         true_acts=[float(a) for a in w.acts], predicted=[float(p) for p in pred])
        for w, pred in zip(windows, predicted)
    ]
    true = np.concatenate([np.asarray(r.true_acts, dtype=np.float32) for r in records]) if records else np.zeros(0)
    pred = np.concatenate([np.asarray(r.predicted, dtype=np.float32) for r in records]) if records else np.zeros(0)
    # computed from float32 values, exactly as the `simulations` table (FLOAT[]) keeps them
    overall = correlation(true, pred)
    per_kind: dict[str, float] = {}
    kind_flags: dict[str, str] = {}
    for kind in KINDS:
        sel = [r for r in records if r.kind == kind]
        if not sel:
            continue
        c = correlation(np.concatenate([np.asarray(r.true_acts, dtype=np.float32) for r in sel]),
                        np.concatenate([np.asarray(r.predicted, dtype=np.float32) for r in sel]))
        per_kind[kind] = c.value
        if c.flag:
            kind_flags[kind] = c.flag
    details: dict[str, Any] = {
        "method": "pearson over all held-out tokens (ev_correlation_score)",
        "n_windows": len(records),
        "n_tokens": int(true.size),
        "windows_per_kind": {k: sum(r.kind == k for r in records) for k in KINDS if any(r.kind == k for r in records)},
        "per_kind": per_kind,
    }
    if overall.flag:
        details["flag"] = overall.flag
    if kind_flags:
        details["per_kind_flags"] = kind_flags
    return Simulated(overall.value, details, records)


# ----------------------------------------------------------------------------- orchestration
def _feature_map(examples: Mapping[tuple[str, int], FeatureExamples] | Iterable[FeatureExamples]):
    if isinstance(examples, Mapping):
        return dict(examples)
    return {(fe.source_id, fe.feature_id): fe for fe in examples}


def shuffled_partners(explanations: Sequence[Explanation]) -> dict[str, Explanation]:
    """For each explanation, another feature's explanation (the next feature in order, preferring
    the same explainer), for the shuffled-explanation baseline. None when there is one feature."""
    by_feature: dict[tuple[str, int], list[Explanation]] = {}
    for e in explanations:
        by_feature.setdefault((e.source_id, e.feature_id), []).append(e)
    keys = sorted(by_feature)
    out: dict[str, Explanation] = {}
    if len(keys) < 2:
        return out
    for i, key in enumerate(keys):
        other = by_feature[keys[(i + 1) % len(keys)]]
        for e in by_feature[key]:
            same = [o for o in other if o.explainer == e.explainer] or other
            out[e.explanation_id] = same[min(e.candidate, len(same) - 1)]
    return out


def _window_max(windows: Sequence[Window], fe: FeatureExamples) -> float:
    m = max((w.max_act for w in windows), default=0.0)
    return m if m > 0 else fe.max_act


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
    embedder: Any = None,
) -> ScoreResults:
    """Score every explanation on its feature's `split` windows with each scorer.

    `simulator`: a spec (`local:MODEL`, `openai:MODEL`, `anthropic:MODEL`, `lexical`,
    `baseline:tokens`) or a Simulator; `client` is the LLM client for an LLM spec. `judge` (with
    `judge_client`) is who answers detection and fuzzing, by default the simulator's backend
    (`lexical` for the no-LLM simulators). `other_explanations` maps an explanation_id to the
    text used for its shuffled baseline; by default another feature's explanation from the list.
    `embedder` (a spec or an embedder, default the offline MiniLM) serves the embedding scorer.
    """
    names = parse_scorers(scorers)
    features = _feature_map(examples)
    sim = make_simulator(simulator, client=client) if "simulation" in names else None
    token_sim = TokenMeanSimulator()
    jdg = None
    if {"detection", "fuzzing"} & set(names):
        if judge is None:
            sim_spec = simulator if isinstance(simulator, str) else simulator.spec
            if sim_spec in ("lexical",) or sim_spec.startswith("baseline"):
                judge = "lexical"
            else:
                judge, judge_client = sim_spec, judge_client or client
        jdg = cls.make_judge(judge, client=judge_client)

    partners = shuffled_partners(explanations)
    others: dict[str, str] = {k: v.text for k, v in partners.items()}
    other_ids = {k: v.explanation_id for k, v in partners.items()}
    if other_explanations:
        others.update(other_explanations)

    results = ScoreResults()
    token_baseline: dict[tuple[str, int], float] = {}
    prepared: dict[tuple[str, str, int], tuple] = {}

    def windows_of(e: Explanation) -> tuple[FeatureExamples, list[Window]]:
        fe = features.get((e.source_id, e.feature_id))
        if fe is None:
            raise KeyError(f"no examples for feature {e.source_id}/{e.feature_id}")
        return fe, [w for w in fe.split(split) if w.tokens]

    async def run_simulation(e: Explanation) -> None:
        fe, windows = windows_of(e)
        if not windows:
            results.failures.append(ScoreFailure(e.explanation_id, "simulation", sim.spec, f"no {split} windows"))
            return
        try:
            preds = await sim.simulate(e.text, windows, feature=fe)
        except SimulationFailed as err:
            results.failures.append(ScoreFailure(e.explanation_id, "simulation", sim.spec, str(err)))
            return
        scored = simulation_score(windows, preds)
        res = ScoreResult(explanation_id=e.explanation_id, scorer="simulation", value=scored.value,
                          simulator=sim.spec, n_examples=len(windows), split=split,
                          details=scored.details, simulations=scored.records)
        if baselines:
            other = others.get(e.explanation_id)
            if other is not None and sim.uses_explanation:
                try:
                    base = simulation_score(windows, await sim.simulate(other, windows, feature=fe))
                    res.baseline_shuffled = base.value
                    res.details["baseline_shuffled"] = {
                        "explanation_id": other_ids.get(e.explanation_id), "text": other,
                        **({"flag": base.details["flag"]} if "flag" in base.details else {}),
                    }
                except SimulationFailed as err:
                    res.details["baseline_shuffled"] = {"error": str(err)}
            key = (e.source_id, e.feature_id)
            if key not in token_baseline:
                tok = simulation_score(windows, await token_sim.simulate("", windows, feature=fe))
                token_baseline[key] = tok.value
            res.baseline_tokens = token_baseline[key]
        results.append(res)

    async def run_classify(e: Explanation, task: str) -> None:
        fe, windows = windows_of(e)
        key = (task, e.source_id, e.feature_id)
        if key not in prepared:
            prepared[key] = cls.prepare(task, windows, _window_max(windows, fe), batch_size,
                                        (e.source_id, e.feature_id, split))
        samples, batch_list = prepared[key]
        if not samples:
            results.failures.append(ScoreFailure(e.explanation_id, task, jdg.spec, f"no {split} windows"))
            return
        try:
            out = await cls.classify(task, jdg, e.text, samples, batch_list)
        except cls.ClassifyFailed as err:
            results.failures.append(ScoreFailure(e.explanation_id, task, jdg.spec, str(err)))
            return
        res = ScoreResult(explanation_id=e.explanation_id, scorer=task, value=out.value,
                          simulator=jdg.spec, n_examples=out.n_examples, split=split, details=out.details)
        other = others.get(e.explanation_id) if baselines else None
        if other is not None:
            try:
                base = await cls.classify(task, jdg, other, samples, batch_list)
                res.baseline_shuffled = base.value
                res.details["baseline_shuffled"] = {"explanation_id": other_ids.get(e.explanation_id),
                                                    "text": other}
            except cls.ClassifyFailed as err:
                res.details["baseline_shuffled"] = {"error": str(err)}
        results.append(res)

    emb = make_embedding_scorer(embedder) if "embedding" in names else None
    jobs = []
    for e in explanations:
        if "simulation" in names:
            jobs.append(run_simulation(e))
        if "embedding" in names:
            jobs.append(_run_embedding(emb, e, windows_of(e)[1], split, results,
                                       others.get(e.explanation_id) if baselines else None,
                                       other_ids.get(e.explanation_id)))
        for task in ("detection", "fuzzing"):
            if task in names:
                jobs.append(run_classify(e, task))
    await asyncio.gather(*jobs)
    order = {e.explanation_id: i for i, e in enumerate(explanations)}
    results.sort(key=lambda r: (order.get(r.explanation_id, 0), SCORERS.index(r.scorer)))
    return results


async def _run_embedding(emb, e: Explanation, windows: Sequence[Window], split: str, results: ScoreResults,
                         other: str | None, other_id: str | None) -> None:
    try:
        results.append(await emb.score(e, windows, split, other, other_id))
    except NoWindows as err:
        results.failures.append(ScoreFailure(e.explanation_id, "embedding", emb.spec, str(err)))
