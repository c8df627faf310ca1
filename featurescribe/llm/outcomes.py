"""What became of each attempt of an LLM call, read from its ledger row: one registry of kinds.

The client (llm/client.py) writes every attempt to `llm_calls` with a `status` and, for a
failure, an `error` that starts with words naming its cause. `OUTCOMES` turns (status, error)
into a kind and the kinds into groups, so a run's summary can tell the server's refusals from
the model's own unusable answers:

- `used`: an answer that was used (`ok`), or one the cache gave (`cached`);
- `model_failure`: the server answered, but the answer had not the asked-for form (status
  `parse_error`: billed, asked again): cut at max_tokens, the wrong number of items, not JSON,
  or otherwise unparseable;
- `server_refusal`: the server refused the request (`request rejected`: the request's form, see
  llm/negotiation.py; re-sent at once when a weaker form was left) or failed it (an HTTP error
  status, a 200 that is no completion);
- `transport`: no answer came (a timeout, a connection error);
- `not_sent`: the run's budget was spent before the attempt;
- `other`: anything else (a cancelled attempt, a bug).

The first kind whose status matches and whose `error` pattern (a regular expression, searched
from the start) matches wins; the last kind of each status has no pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

from featurescribe.statuses import CallStatus

GROUPS = ("used", "model_failure", "server_refusal", "transport", "not_sent", "other")
GROUP_TITLES = {
    "used": "answers used",
    "model_failure": "model failures",
    "server_refusal": "server refusals",
    "transport": "no answer (transport)",
    "not_sent": "not sent (budget)",
    "other": "other failures",
}


@dataclass(frozen=True)
class OutcomeKind:
    name: str  # what the run summary and `runs.call_outcomes` count
    group: str  # one of GROUPS
    status: str  # the `llm_calls.status` it applies to
    error: str | None = None  # a regular expression the `error` starts with (None: any)
    title: str = ""  # how the summary names it

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"unknown outcome group {self.group!r}")


OUTCOMES: tuple[OutcomeKind, ...] = (
    OutcomeKind("ok", "used", CallStatus.OK, title="answered"),
    OutcomeKind("cached", "used", CallStatus.CACHED, title="from the cache"),
    OutcomeKind("truncated", "model_failure", CallStatus.PARSE_ERROR, r"answer cut at max_tokens",
                "cut at max tokens"),
    OutcomeKind("wrong_count", "model_failure", CallStatus.PARSE_ERROR, r"expected \d+ .*got \d+",
                "wrong number of items"),
    OutcomeKind("not_json", "model_failure", CallStatus.PARSE_ERROR, r"answer is not valid JSON",
                "not JSON"),
    OutcomeKind("unparseable", "model_failure", CallStatus.PARSE_ERROR, title="unusable answer"),
    OutcomeKind("request_rejected_resent", "server_refusal", CallStatus.ERROR, r"request rejected \(",
                "request rejected, re-sent in a weaker form"),
    OutcomeKind("request_rejected", "server_refusal", CallStatus.ERROR, r"request rejected",
                "request rejected"),
    OutcomeKind("timeout", "transport", CallStatus.ERROR, r"timeout|HTTP 408\b", "timeout"),
    OutcomeKind("http_error", "server_refusal", CallStatus.ERROR, r"HTTP \d+", "HTTP error"),
    OutcomeKind("not_a_completion", "server_refusal", CallStatus.ERROR, r"the server's answer is not",
                "answer is no completion"),
    OutcomeKind("connection_error", "transport", CallStatus.ERROR, r"connection error",
                "connection error"),
    OutcomeKind("budget", "not_sent", CallStatus.BUDGET, title="budget spent"),
    OutcomeKind("other", "other", CallStatus.ERROR, title="other"),
)
OTHER = "other"  # the kind of a row no entry matches

KINDS = {k.name: k for k in OUTCOMES}
