"""The scorers and the no-LLM simulators, one entry each.

A scorer is an async function `(explanation, ScoringContext) -> ScoreResult | ScoreFailure`;
`score_explanations` runs the ones asked for, and builds a simulator and a judge only when one
of them needs it. The CLI's `--scorers` choices, `LabelOptions` checks and the order of results
come from `SCORERS`. Adding a scorer: a module with its function, and one `ScorerKind(...)` line
in `BUILTIN_SCORERS` (or `SCORERS.register(...)` from outside the package).

Simulators: any LLM backend of `llm/registry.py` simulates through the simulator its client's
capabilities call for (`llm_simulator`); the no-LLM ones are listed in `SIMULATORS` by spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from featurescribe.llm.base import parse_backend_spec
from featurescribe.llm.registry import BACKENDS, NO_LLM_KINDS, kind_of
from featurescribe.records import Explanation, ScoreResult
from featurescribe.scorers.classify import Judge, LexicalJudge, LLMJudge, LocalJudge, score_detection, score_fuzzing
from featurescribe.scorers.context import ScoreFailure, ScoringContext
from featurescribe.scorers.embedding import score_embedding_in_context
from featurescribe.scorers.intervention import score_intervention_in_context
from featurescribe.scorers.intruder import score_intruder
from featurescribe.scorers.simulation import score_simulation
from featurescribe.scorers.simulators import (
    LexicalSimulator,
    LocalSimulator,
    LogprobSimulator,
    Simulator,
    StructuredSimulator,
    TokenMeanSimulator,
)

ScoreFn = Callable[[Explanation, ScoringContext], Awaitable["ScoreResult | ScoreFailure"]]


@dataclass(frozen=True)
class ScorerKind:
    name: str  # what `scores.scorer` records and `--scorers` takes
    score: ScoreFn
    uses_simulator: bool = False  # needs the context's simulator
    uses_judge: bool = False  # needs the context's detection/fuzzing judge
    uses_steering: bool = False  # needs the context's steering (the source's model) and pair judge


BUILTIN_SCORERS: tuple[ScorerKind, ...] = (
    ScorerKind("simulation", score_simulation, uses_simulator=True),
    ScorerKind("detection", score_detection, uses_judge=True),
    ScorerKind("fuzzing", score_fuzzing, uses_judge=True),
    ScorerKind("intervention", score_intervention_in_context, uses_steering=True),
    ScorerKind("embedding", score_embedding_in_context),
    ScorerKind("intruder", score_intruder, uses_judge=True),
)


class _Registry:
    """Entries by name, in registration order."""

    def __init__(self, entries: Sequence[Any], key: str):
        self._key = key
        self._items: dict[str, Any] = {}
        for e in entries:
            self.register(e)

    def register(self, entry: Any) -> None:
        self._items[getattr(entry, self._key)] = entry

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> Any:
        return self._items.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)


SCORERS = _Registry(BUILTIN_SCORERS, "name")


def parse_scorers(text: str | Sequence[str] | None) -> list[str]:
    """'simulation,detection' -> ['simulation', 'detection']; an unknown name is a ValueError."""
    if text is None:
        return ["simulation"]
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if SCORERS.get(n) is None]
    if bad:
        raise ValueError(f"unknown scorer(s) {', '.join(bad)}: use {', '.join(SCORERS.names())}")
    return list(dict.fromkeys(names)) or ["simulation"]


# ----------------------------------------------------------------------------- simulators
@dataclass(frozen=True)
class SimulatorKind:
    spec: str  # the whole BACKEND spec, e.g. 'lexical'
    make: Callable[[], Simulator]
    judge: str = "lexical"  # who answers detection and fuzzing when this simulator is named


BUILTIN_SIMULATORS: tuple[SimulatorKind, ...] = (
    SimulatorKind("lexical", LexicalSimulator),
    SimulatorKind("baseline:tokens", TokenMeanSimulator),
)
SIMULATORS = _Registry(BUILTIN_SIMULATORS, "spec")


def simulator_kind(spec: str) -> SimulatorKind | None:
    """The no-LLM simulator a spec names ('baseline' alone means 'baseline:tokens')."""
    text = spec.strip().lower()
    return SIMULATORS.get(text) or (SIMULATORS.get("baseline:tokens") if text == "baseline" else None)


def simulator_specs_help() -> str:
    return ", ".join((*SIMULATORS.names(), BACKENDS.specs_help()))


def check_simulator_spec(spec: str) -> None:
    """ValueError for a spec that names no simulator."""
    if simulator_kind(spec) is not None:
        return
    kind, model = parse_backend_spec(spec)
    if kind_of(spec) is None:
        raise ValueError(f"unknown simulator {spec!r}: use {simulator_specs_help()}")
    if not model:
        raise ValueError(f"simulator {spec!r} names no model (e.g. {kind}:MODEL)")


def llm_simulator(client: Any, windows_per_call: int = 1) -> Simulator:
    """The simulator an LLM client's capabilities call for: candidate probabilities in one
    forward pass (local), expected values from logprobs, else integers as structured output;
    the API ones send `windows_per_call` windows a request."""
    if getattr(client, "supports_candidate_probs", False):
        return LocalSimulator(client)
    if getattr(client, "supports_logprobs", False):
        return LogprobSimulator(client, windows_per_call)
    return StructuredSimulator(client, windows_per_call)


def make_simulator(spec: str | Simulator, client: Any = None, windows_per_call: int = 1) -> Simulator:
    """A simulator for a backend spec. LLM specs need `client` (from llm.make_client) unless the
    llm layer can make one here."""
    if isinstance(spec, Simulator):
        return spec
    kind = simulator_kind(spec)
    if kind is not None:
        return kind.make()
    if parse_backend_spec(spec)[0] == "baseline":
        raise ValueError(f"unknown baseline simulator {spec!r}: use baseline:tokens")
    if client is None:
        from featurescribe.llm import make_client  # the llm layer builds and configures clients

        client = make_client(spec)
    return llm_simulator(client, windows_per_call)


@dataclass(frozen=True)
class JudgeKind:
    spec: str
    make: Callable[[], Judge]


# the no-LLM judges of detection and fuzzing, by spec
JUDGES = _Registry((JudgeKind("lexical", LexicalJudge),), "spec")


def make_judge(spec: str | Judge, client: Any = None) -> Judge:
    """A judge for detection and fuzzing: a no-LLM one by spec, or the one an LLM client's
    capabilities call for (candidate probabilities in one pass for local models)."""
    if isinstance(spec, Judge):
        return spec
    kind = JUDGES.get(spec)
    if kind is not None:
        return kind.make()
    if parse_backend_spec(spec)[0] in NO_LLM_KINDS:
        raise ValueError(f"{spec} cannot judge detection or fuzzing: use {', '.join(JUDGES.names())} or an LLM")
    if client is None:
        from featurescribe.llm import make_client

        client = make_client(spec)
    return LocalJudge(client) if getattr(client, "supports_candidate_probs", False) else LLMJudge(client)


def default_judge(simulator: str | Simulator) -> str:
    """Who judges detection and fuzzing when no judge is named: the simulator's backend, or
    the judge a no-LLM simulator names."""
    spec = simulator if isinstance(simulator, str) else simulator.spec
    kind = simulator_kind(spec)
    return kind.judge if kind is not None else spec
