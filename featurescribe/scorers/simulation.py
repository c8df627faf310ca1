"""The simulation scorer: Pearson correlation between the true raw activations and the
simulator's predictions over every window of the split concatenated (top, quantile and random
alike), as Bills et al.'s `ev_correlation_score`. `details.per_kind` holds the same correlation
over each kind's windows alone. Each window's arrays go to `ScoreResult.simulations`, so the
score can be recomputed from the `simulations` table. A constant true or predicted array scores
0 with `details.flag`; never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featurescribe.records import KINDS, Explanation, ScoreResult, SimulationRecord, Window
from featurescribe.scorers.context import ScoreFailure, ScoringContext
from featurescribe.scorers.metrics import correlation
from featurescribe.scorers.simulators import SimulationFailed


@dataclass
class Simulated:
    value: float
    details: dict
    records: list[SimulationRecord]


def _check_lined_up(windows: Sequence[Window], predicted: Sequence[Sequence[float]]) -> None:
    """One prediction per token of every window, or ValueError: a short list must not shrink the
    records scored (the baselines beside the score are on all of them), nor shift the tokens."""
    if len(predicted) != len(windows):
        raise ValueError(f"{len(predicted)} prediction lists for {len(windows)} windows")
    for w, pred in zip(windows, predicted):
        if len(pred) != len(w.acts):
            raise ValueError(f"window {w.seq_id}:{w.start_pos}: {len(pred)} predictions for {len(w.acts)} tokens")


def simulation_score(windows: Sequence[Window], predicted: Sequence[Sequence[float]]) -> Simulated:
    """The score from windows and predictions, with per-kind breakdowns and records."""
    _check_lined_up(windows, predicted)
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


async def _shuffled_baseline(e: Explanation, ctx: ScoringContext, fe, windows, res: ScoreResult) -> None:
    other = ctx.baseline_text(e)
    if other is None or not ctx.simulator.uses_explanation:
        return
    try:
        base = simulation_score(windows, await ctx.simulator.simulate(other, windows, feature=fe))
    except SimulationFailed as err:
        res.details["baseline_shuffled"] = {"error": str(err)}
        return
    res.baseline_shuffled = base.value
    res.details["baseline_shuffled"] = {
        **ctx.baseline_note(e, other), **({"flag": base.details["flag"]} if "flag" in base.details else {})}


async def _token_baseline(e: Explanation, ctx: ScoringContext, fe, windows) -> float:
    key = ("baseline_tokens", e.source_id, e.feature_id)
    if key not in ctx.cache:
        preds = await ctx.token_simulator.simulate("", windows, feature=fe)
        ctx.cache[key] = simulation_score(windows, preds).value
    return ctx.cache[key]


async def score_simulation(e: Explanation, ctx: ScoringContext) -> ScoreResult | ScoreFailure:
    """The simulation score of one explanation, with its baselines."""
    sim = ctx.simulator
    fe, windows = ctx.windows_of(e)
    if not windows:
        return ScoreFailure(e.explanation_id, "simulation", sim.spec, f"no {ctx.split} windows")
    try:
        preds = await sim.simulate(e.text, windows, feature=fe)
    except SimulationFailed as err:
        return ScoreFailure(e.explanation_id, "simulation", sim.spec, str(err))
    scored = simulation_score(windows, preds)
    res = ScoreResult(explanation_id=e.explanation_id, scorer="simulation", value=scored.value,
                      simulator=sim.spec, n_examples=len(windows), split=ctx.split,
                      details=scored.details, simulations=scored.records)
    if ctx.baselines:
        await _shuffled_baseline(e, ctx, fe, windows, res)
        res.baseline_tokens = await _token_baseline(e, ctx, fe, windows)
    return res
