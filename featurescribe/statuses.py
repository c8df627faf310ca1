"""The words the database stores for statuses, in one place. Each is a `StrEnum`, so a member
is the plain string in SQL, JSON and Arrow ('completed', 'ok', ...); the schema's contract
(DESIGN.md) names the same values."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """`runs.status`."""

    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"  # at the budget
    WAITING = "waiting"  # label --batch returned with batches still running
    FAILED = "failed"
    CANCELLED = "cancelled"  # Ctrl-C
    INTERRUPTED = "interrupted"  # the process was gone before it could record its end


class CallStatus(StrEnum):
    """`llm_calls.status`."""

    OK = "ok"
    ERROR = "error"
    PARSE_ERROR = "parse_error"  # billed
    CACHED = "cached"
    BUDGET = "budget"  # not sent: the run's budget was spent


class ExplanationStatus(StrEnum):
    """`explanations.status`."""

    OK = "ok"
    FAILED = "failed"  # text '' and the error beside it


class FeatureStatus(StrEnum):
    """`features.status`."""

    ALIVE = "alive"
    DEAD = "dead"  # no activations
    RARE = "rare"  # too few active sequences to sample
