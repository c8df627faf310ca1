"""Scorers: how well an explanation predicts its feature on held-out windows.

- `score_explanations(explanations, examples, simulator=..., scorers=[...])`: simulation
  (correlation), detection and fuzzing (balanced accuracy), with baselines beside each score.
- `make_simulator(spec, client=...)`: `local:MODEL`, `openai:MODEL`, `anthropic:MODEL`,
  `lexical`, `baseline:tokens`.
- `planted`: a bed of features with known rules and true explanations, to test the judges.
"""

from featurescribe.scorers.scoring import (
    SCORERS,
    ScoreFailure,
    ScoreResults,
    parse_scorers,
    score_explanations,
    simulation_score,
)
from featurescribe.scorers.simulators import (
    LexicalSimulator,
    LocalSimulator,
    LogprobSimulator,
    SimulationFailed,
    Simulator,
    StructuredSimulator,
    TokenMeanSimulator,
    make_simulator,
)

__all__ = [
    "SCORERS",
    "LexicalSimulator",
    "LocalSimulator",
    "LogprobSimulator",
    "ScoreFailure",
    "ScoreResults",
    "SimulationFailed",
    "Simulator",
    "StructuredSimulator",
    "TokenMeanSimulator",
    "make_simulator",
    "parse_scorers",
    "score_explanations",
    "simulation_score",
]
