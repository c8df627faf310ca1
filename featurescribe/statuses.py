"""The words the database stores for statuses, in one place. Each is a `StrEnum`, so a member
is the plain string in SQL, JSON and Arrow ('completed', 'ok', ...); the schema's contract
(DESIGN.md) names the same values."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ExitStatus(IntEnum):
    """The exit status of `featurescribe` (README, "Exit status")."""

    OK = 0
    ERROR = 1  # a backend that cannot answer (circuit breaker), a run that labelled nothing
    USAGE = 2  # bad input: one line on stderr, nothing written
    PARTIAL = 3  # the run finished, but some features failed (`runs.status` 'partial')
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2
    TERMINATED = 143  # SIGTERM: 128 + 15


class RunStatus(StrEnum):
    """`runs.status`."""

    RUNNING = "running"
    COMPLETED = "completed"
    PARTIAL = "partial"  # finished, some features failed (counts in `error`)
    STOPPED = "stopped"  # at the budget
    WAITING = "waiting"  # label --batch returned with batches still running
    FAILED = "failed"
    CANCELLED = "cancelled"  # Ctrl-C, before SIGINT and SIGTERM were recorded as 'interrupted'
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM, or the process was gone before it could record its end


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
    GATED = "gated"  # below the intruder gate (label --gate intruder:T): left unlabelled


class StructuredForm(StrEnum):
    """`llm_capabilities.structured`: how structured answers are asked for, best first
    (llm/negotiation.py); `label --structured` takes these or `auto`."""

    JSON_SCHEMA = "json_schema"  # response_format json_schema: the server enforces the schema
    JSON_OBJECT = "json_object"  # response_format json_object (+ its schema), the schema stated in the prompt
    TEXT = "text"  # no response_format: the schema in the prompt, the answer parsed strictly


STRUCTURED_CHOICES = ("auto", *(f.value for f in StructuredForm))  # label --structured
