"""A run's LLM attempts by outcome (llm/outcomes.py, flows/call_outcomes.py): the server's
refusals told apart from the model's own unusable answers, printed by `label` and kept in
`runs.call_outcomes`."""

from __future__ import annotations

import json
import re

import pytest

from featurescribe.flows.call_outcomes import CallOutcomes, print_call_outcomes
from featurescribe.llm.outcomes import GROUPS, KINDS, OUTCOMES
from featurescribe.statuses import CallStatus
from featurescribe.store.call_outcomes import count_call_outcomes
from featurescribe.store.llm_calls import CallRow
from tests.dbq import q
from tests.fake_llm import LLAMA_CPP_JSON_SCHEMA_ERROR

# (status, error) as the client writes them, and the kind each is
LEDGER = [
    (CallStatus.OK, None, "ok"),
    (CallStatus.OK, "no price for openai:smollm2", "ok"),
    (CallStatus.CACHED, None, "cached"),
    (CallStatus.PARSE_ERROR, "answer cut at max_tokens (finish_reason length)", "truncated"),
    (CallStatus.PARSE_ERROR, "expected 32 lines of token and activation, got 1", "wrong_count"),
    (CallStatus.PARSE_ERROR, "expected 4 answers, got 3", "wrong_count"),
    (CallStatus.PARSE_ERROR, "answer is not valid JSON: Expecting value", "not_json"),
    (CallStatus.PARSE_ERROR, "the explanation is empty", "unparseable"),
    (CallStatus.PARSE_ERROR, None, "unparseable"),
    (CallStatus.ERROR, f"request rejected (HTTP 500: {LLAMA_CPP_JSON_SCHEMA_ERROR}); structured output "
                       "json_schema -> json_object", "request_rejected_resent"),
    (CallStatus.ERROR, "request rejected (HTTP 400: bad seed); already without seed", "request_rejected_resent"),
    (CallStatus.ERROR, "request rejected by http://127.0.0.1:1/v1 (HTTP 400: logprobs)", "request_rejected"),
    (CallStatus.ERROR, "HTTP 503: overloaded", "http_error"),
    (CallStatus.ERROR, "HTTP 404: The model `x` does not exist.", "http_error"),
    (CallStatus.ERROR, "HTTP 408: request timeout", "timeout"),
    (CallStatus.ERROR, "timeout after 0.3 s", "timeout"),
    (CallStatus.ERROR, "connection error: ConnectError", "connection_error"),
    (CallStatus.ERROR, "the server's answer is not a completion: '[]'", "not_a_completion"),
    (CallStatus.ERROR, "cancelled", "other"),
    (CallStatus.BUDGET, "budget of $0.01 reached", "budget"),
]


def test_every_ledger_row_gets_its_kind(store, con):
    for status, error, _ in LEDGER:
        store.record(CallRow(backend="openai", model="m", prompt_hash="k", status=status, error=error, run_id="r1"))
    store.record(CallRow(backend="openai", model="m", prompt_hash="k", status=CallStatus.OK, run_id="r2"))
    store.flush()
    expected: dict[str, int] = {}
    for *_, kind in LEDGER:
        expected[kind] = expected.get(kind, 0) + 1
    assert count_call_outcomes(con, "r1") == expected
    assert count_call_outcomes(con, "r2") == {"ok": 1}
    assert count_call_outcomes(con, "none") == {}


def test_groups_and_the_printed_lines():
    outcomes = CallOutcomes({"ok": 7, "cached": 2, "wrong_count": 3, "request_rejected_resent": 1})
    assert outcomes.as_record() == {
        "used": {"ok": 7, "cached": 2}, "model_failure": {"wrong_count": 3},
        "server_refusal": {"request_rejected_resent": 1}, "transport": {}, "not_sent": {}, "other": {}}
    lines = _printed(outcomes)
    assert lines[0] == "LLM attempts by outcome"
    assert re.fullmatch(r"  answers used +9  \[answered 7, from the cache 2\]", lines[1]), lines
    assert re.fullmatch(r"  model failures +3  \[wrong number of items 3\]", lines[2]), lines
    assert re.fullmatch(r"  server refusals +1  \[request rejected, re-sent in a weaker form 1\]", lines[3])
    assert len(lines) == 4  # empty groups other than these three are not shown
    assert _printed(CallOutcomes({})) == []  # a run without LLM calls prints nothing


def test_the_registry_is_consistent():
    assert {k.group for k in OUTCOMES} == set(GROUPS)
    assert len(KINDS) == len(OUTCOMES)
    for status in (CallStatus.OK, CallStatus.CACHED, CallStatus.PARSE_ERROR, CallStatus.ERROR, CallStatus.BUDGET):
        last = [k for k in OUTCOMES if k.status == status][-1]
        assert last.error is None, f"status {status} needs a catch-all kind"


def _printed(outcomes: CallOutcomes) -> list[str]:
    import io

    buf = io.StringIO()
    print_call_outcomes(outcomes, out=buf)
    return buf.getvalue().splitlines()


@pytest.fixture
def llama(fake_llm):
    fake_llm.refuse.update({"response_format.json_schema": (500, LLAMA_CPP_JSON_SCHEMA_ERROR)})
    return fake_llm


def test_label_prints_and_keeps_refusals_apart_from_model_failures(labdb, llama, capsys, prefect_server,
                                                                   fresh_limiters):
    """The `label` command at a server that refuses json_schema (llama.cpp) and fails one request
    with a 503, with a model that once answers without the asked-for form."""
    from featurescribe.cli import main
    from tests.test_label import SOURCE, _reader

    llama.responder = _reader
    llama.inject("503")
    llama.inject("malformed")
    spec = "openai:smollm2"
    assert main(["label", "--db", labdb, "--source", SOURCE, "--no-progress", "--features", "2:4",
                 "--explainer", spec, "--simulator", spec, "--scorers", "simulation,detection"]) == 0
    out = capsys.readouterr().out
    ((run_id, stored),) = q(labdb, "SELECT run_id, call_outcomes FROM runs WHERE flow = 'label'")
    stored = json.loads(stored)
    assert stored["server_refusal"]["http_error"] == 1
    assert stored["server_refusal"]["request_rejected_resent"] >= 1
    assert "request_rejected" not in stored["server_refusal"]  # every refusal was sent again
    assert sum(stored["model_failure"].values()) == 1
    # the groups add up to the ledger's own statuses
    by_status = dict(q(labdb, "SELECT status, count(*) FROM llm_calls WHERE run_id = ? GROUP BY 1", [run_id]))
    assert sum(stored["used"].values()) == by_status.get("ok", 0) + by_status.get("cached", 0)
    assert sum(stored["model_failure"].values()) == by_status.get("parse_error", 0)
    assert sum(stored["server_refusal"].values()) + sum(stored["transport"].values()) == by_status["error"]
    refusals = sum(stored["server_refusal"].values())
    assert re.search(rf"^  server refusals +{refusals}  \[.*HTTP error 1", out, re.M), out
    assert re.search(r"^  model failures +1  \[", out, re.M), out
    used = re.search(r"^  answers used +(\d+)  \[(.*)\]$", out, re.M)
    assert int(used[1]) == by_status["ok"] + by_status.get("cached", 0), out
    assert f"answered {by_status['ok']}" in used[2], out
