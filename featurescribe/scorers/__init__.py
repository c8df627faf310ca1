"""Scorers: how well an explanation predicts its feature on held-out windows.

- `score_explanations(explanations, examples, simulator=..., scorers=[...])`: simulation
  (correlation), detection and fuzzing (balanced accuracy), with baselines beside each score.
- `make_simulator(spec, client=...)`: `local:MODEL`, `openai:MODEL`, `anthropic:MODEL`,
  `lexical`, `baseline:tokens`.
- `registry.py`: the scorers and no-LLM simulators, one entry each.
"""

from featurescribe.scorers.context import ScoreFailure, ScoreOutcome, ScoringContext
from featurescribe.scorers.registry import (
    SCORERS,
    SIMULATORS,
    ScorerKind,
    SimulatorKind,
    check_simulator_spec,
    make_simulator,
    parse_scorers,
)
from featurescribe.scorers.scoring import score_explanations, simulation_score
from featurescribe.scorers.simulators import (
    LexicalSimulator,
    LocalSimulator,
    LogprobSimulator,
    SimulationFailed,
    Simulator,
    StructuredSimulator,
    TokenMeanSimulator,
)

__all__ = [
    "SCORERS",
    "SIMULATORS",
    "LexicalSimulator",
    "LocalSimulator",
    "LogprobSimulator",
    "ScoreFailure",
    "ScoreOutcome",
    "ScorerKind",
    "ScoringContext",
    "SimulationFailed",
    "SimulatorKind",
    "Simulator",
    "StructuredSimulator",
    "TokenMeanSimulator",
    "check_simulator_spec",
    "make_simulator",
    "parse_scorers",
    "score_explanations",
    "simulation_score",
]
