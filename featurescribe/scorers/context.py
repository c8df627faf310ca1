"""What every scorer is handed: the windows, the simulator or judge, the shuffled baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featurescribe.records import Explanation, FeatureExamples, ScoreResult, Window


@dataclass
class ScoreFailure:
    """An explanation a scorer could not score (the LLM layer gave up, no windows, ...)."""

    explanation_id: str
    scorer: str
    judge: str | None
    error: str


@dataclass
class ScoreOutcome:
    """What `score_explanations` returns: the scores, and the explanations it could not score."""

    results: list[ScoreResult] = field(default_factory=list)
    failures: list[ScoreFailure] = field(default_factory=list)

    def add(self, item: ScoreResult | ScoreFailure) -> None:
        (self.failures if isinstance(item, ScoreFailure) else self.results).append(item)


@dataclass
class ScoringContext:
    """One `score_explanations` call, shared by its scorers. The caches hold what is the same for
    every explanation of a feature (token baseline, judge samples)."""

    features: dict[tuple[str, int], FeatureExamples]
    split: str
    simulator: Any = None  # a scorers.simulators.Simulator, when a scorer simulates
    token_simulator: Any = None  # the baseline:tokens simulator, for `baseline_tokens`
    judge: Any = None  # a scorers.classify.Judge, when a scorer classifies
    steering: Any = None  # a scorers.intervention.FeatureSteering, when a scorer steers the model
    pair_judge: Any = None  # a scorers.intervention.PairJudge, when a scorer steers the model
    others: dict[str, str] = field(default_factory=dict)  # explanation_id -> shuffled-baseline text
    other_ids: dict[str, str] = field(default_factory=dict)  # explanation_id -> its explanation_id
    baselines: bool = True
    batch_size: int = 8
    cache: dict[Any, Any] = field(default_factory=dict)

    def windows_of(self, e: Explanation) -> tuple[FeatureExamples, list[Window]]:
        fe = self.features.get((e.source_id, e.feature_id))
        if fe is None:
            raise KeyError(f"no examples for feature {e.source_id}/{e.feature_id}")
        return fe, [w for w in fe.split(self.split) if w.tokens]

    def baseline_text(self, e: Explanation) -> str | None:
        return self.others.get(e.explanation_id) if self.baselines else None

    def baseline_note(self, e: Explanation, text: str) -> dict:
        return {"explanation_id": self.other_ids.get(e.explanation_id), "text": text}
