"""Small typed records passed between stages (sampling -> labelers -> scorers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

SPLITS = ("explain", "valid", "test")
KINDS = ("top", "quantile", "random")
SCALE_MAX = 10


def discretize(acts: Sequence[float], max_act: float) -> list[int]:
    """Activations on the 0-10 integer scale shown to LLMs: floor(10 * relu(a) / max_a)."""
    if not max_act or max_act <= 0 or not math.isfinite(max_act):
        return [0 for _ in acts]
    return [min(SCALE_MAX, int(math.floor(SCALE_MAX * max(a, 0.0) / max_act))) for a in acts]


@dataclass
class Window:
    """A window of tokens of one sequence with one feature's raw activation at each token."""

    seq_id: int
    start_pos: int
    tokens: list[str]
    acts: list[float]
    kind: str = "top"  # 'top' | 'quantile' | 'random'
    split: str = "explain"  # 'explain' | 'valid' | 'test'
    token_ids: list[int] | None = None
    quantile: int | None = None

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.tokens)

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0


@dataclass
class FeatureExamples:
    """Everything sampled for one feature, across the three disjoint splits."""

    source_id: str
    feature_id: int
    max_act: float
    windows: list[Window] = field(default_factory=list)
    # the tokens the feature's output direction promotes most (label --logit-lens), else None
    promoted: list[str] | None = None
    # the tokens whose next-token probability rises / falls most when the feature is steered
    # (label --output-effects), else None
    output_rising: list[str] | None = None
    output_falling: list[str] | None = None

    def split(self, name: str, kind: str | None = None) -> list[Window]:
        return [w for w in self.windows if w.split == name and (kind is None or w.kind == kind)]


@dataclass
class Explanation:
    explanation_id: str
    source_id: str
    feature_id: int
    text: str
    explainer: str  # backend spec, e.g. 'openai:gpt-4o-mini' or 'baseline:tokens'
    method: str  # e.g. 'pairs', 'highlighted', 'tokens'
    candidate: int = 0
    run_id: str | None = None


@dataclass
class SimulationRecord:
    """One window's true and simulated activations, as stored in `simulations`."""

    seq_id: int
    start_pos: int
    split: str
    kind: str
    true_acts: list[float]
    predicted: list[float]


@dataclass
class ScoreResult:
    explanation_id: str
    scorer: str  # 'simulation' | 'detection' | 'fuzzing'
    value: float
    simulator: str | None
    n_examples: int
    split: str = "test"
    details: dict[str, Any] = field(default_factory=dict)
    baseline_shuffled: float | None = None
    baseline_tokens: float | None = None
    # with --baseline sample:N, a score without its own shuffled baseline carries the mean of
    # those of its chunk that have one
    baseline_population: float | None = None
    simulations: list[SimulationRecord] = field(default_factory=list)
    # the intervention scorer's audit rows (scorers/intervention.py InterventionRecord)
    interventions: list[Any] = field(default_factory=list)
