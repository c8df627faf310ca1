"""Failure semantics of a label run: the circuit breaker per backend (one line naming the backend,
its URL and the kind, before more is spent), 'partial' and 'failed' runs with their exit
statuses. Through the real `label` command (the Prefect flow) and the real openai SDK against
tests/fake_llm.py, or a port where nothing listens."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from featurescribe.cli import main
from featurescribe.llm.breaker import CircuitBreaker
from featurescribe.statuses import ExitStatus
from tests.dbq import q
from tests.test_sampling import SOURCE

LIMIT = 6

pytestmark = pytest.mark.usefixtures("no_global_limits")


def _cli(db, *extra):
    return main(["label", "--db", db, "--source", SOURCE, "--no-progress", *extra])


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("featurescribe: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _attempts(db) -> int:
    return q(db, "SELECT count(*) FROM llm_calls WHERE status IN ('error', 'parse_error')")[0][0]


def test_dead_port_stops_the_run_with_one_line(labdb, monkeypatch, capsys, prefect_server):
    port = _dead_port()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--max-failures", str(LIMIT), "--concurrency", "2")
    assert rc == ExitStatus.ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert f"openai:gpt-4o-mini at http://127.0.0.1:{port}/v1" in line and "transport" in line, line
    # stopped at the limit: the calls in flight when it tripped at most come on top
    assert LIMIT <= _attempts(labdb) <= LIMIT + 2
    assert q(labdb, "SELECT status FROM runs") == [("failed",)]
    assert q(labdb, "SELECT count(*) FROM explanations") == [(0,)]


@pytest.mark.parametrize("kind,setup,words", [
    ("not_found", lambda s: setattr(s, "models", {"another-model"}), "not found"),
    ("server", lambda s: s.inject("500", times=1000), "server errors"),
])
def test_each_kind_trips_the_breaker(labdb, fake_llm, capsys, prefect_server, kind, setup, words):
    setup(fake_llm)
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--max-failures", str(LIMIT), "--concurrency", "1")
    assert rc == ExitStatus.ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert f"openai:gpt-4o-mini at {fake_llm.base_url_openai}" in line and words in line, line
    assert len(fake_llm.requests_for("openai")) == LIMIT  # not one more
    assert q(labdb, "SELECT status FROM runs") == [("failed",)]


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
def test_a_refused_key_stops_the_run_at_once_as_bad_input(labdb, fake_llm, capsys, prefect_server, spec):
    """A wrong key is wrong for every request: the first 401 stops the run, exit 2 as a missing key
    (it was --max-failures refused requests, then exit 1; label --batch already said 2)."""
    fake_llm.api_key = "the-right-key"
    rc = _cli(labdb, "--explainer", spec, "--max-failures", str(LIMIT), "--concurrency", "1")
    assert rc == ExitStatus.USAGE
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"featurescribe: error: {spec} at ") and "refused the API key" in line, line
    assert len(fake_llm.requests) == 1
    assert q(labdb, "SELECT status FROM runs") == [("failed",)]
    assert q(labdb, "SELECT count(*) FROM explanations") == [(0,)]


@pytest.mark.parametrize("spec,kind", [("openai:gpt-4o-mini", "quota"), ("anthropic:claude-haiku-4-5", "quota"),
                                       ("anthropic:claude-haiku-4-5", "spend_limit"),
                                       ("anthropic:claude-haiku-4-5", "low_credit")])
def test_an_exhausted_quota_stops_the_run_at_once(labdb, fake_llm, capsys, prefect_server, spec, kind):
    """No credit left: the first answer stops the run with one line naming the backend, exit 1
    (as a refused key or an outage); before, each feature's call was retried 8 times."""
    fake_llm.inject(kind, times=1000)
    rc = _cli(labdb, "--explainer", spec, "--concurrency", "1")
    assert rc == ExitStatus.ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"featurescribe: error: {spec} at ") and "quota or billing is exhausted" in line, line
    assert len(fake_llm.requests) == 1
    assert q(labdb, "SELECT status FROM runs") == [("failed",)]
    assert q(labdb, "SELECT status, cost_usd FROM llm_calls") == [("error", 0.0)]  # a 429/402 is not billed


def test_a_provider_that_rate_limits_everything_trips_the_breaker(labdb, fake_llm, capsys, prefect_server,
                                                                  monkeypatch):
    """429s without Retry-After on every request: --max-failures of them in a row (that lasted
    FEATURESCRIBE_LLM_RATE_LIMIT_PATIENCE, 0 here) stop the run, instead of 8 backed-off attempts
    on every feature."""
    monkeypatch.setenv("FEATURESCRIBE_LLM_RATE_LIMIT_PATIENCE", "0")
    fake_llm.inject("429", times=1000, retry_after=None)
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--max-failures", "3", "--concurrency", "2")
    assert rc == ExitStatus.ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert "rate limits (429)" in line and "openai:gpt-4o-mini at" in line, line
    assert 3 <= len(fake_llm.requests) <= 3 + 2
    assert q(labdb, "SELECT DISTINCT status, cost_usd FROM llm_calls") == [("error", 0.0)]


def test_a_simulator_that_never_parses_trips_while_the_explainer_works(labdb, fake_llm, capsys, prefect_server):
    def responder(req):
        if req.json_schema and "explanation" in json.dumps(req.json_schema):
            return json.dumps({"explanation": "the tokens 'a' and 'b'"})
        return "I cannot do that"

    fake_llm.responder = responder
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--simulator", "openai:gpt-4o-mini",
              "--max-failures", str(LIMIT), "--concurrency", "2")
    assert rc == ExitStatus.ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert "unparseable answers" in line and "simulate calls" in line, line
    n_parse = q(labdb, "SELECT count(*) FROM llm_calls WHERE status = 'parse_error'")[0][0]
    assert LIMIT <= n_parse <= LIMIT + 2  # billed, and no more than the limit (plus those in flight)


def _bad_feature(req) -> bool:
    return int(hashlib.sha256(req.user_text.encode()).hexdigest(), 16) % 3 == 0


def test_some_features_failed_is_partial_exit_3(labdb, fake_llm, capsys, prefect_server):
    def responder(req):
        return "garbage" if _bad_feature(req) else json.dumps({"explanation": "the tokens 'a' and 'b'"})

    fake_llm.responder = responder
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--features", "2:8")
    out, err = capsys.readouterr()
    n_failed = len([r for r in fake_llm.requests_for("openai") if _bad_feature(r)]) // 3  # 3 attempts each
    assert 0 < n_failed < 6, "the responder should fail some of the 6 features, not all"
    assert rc == ExitStatus.PARTIAL, out
    status, note = q(labdb, "SELECT status, error FROM runs")[0]
    assert status == "partial"
    assert note.startswith(f"{6 - n_failed} labelled, {n_failed} failed"), note
    assert _one_error_line(err) == f"featurescribe: error: {note}"  # the reason on stderr too
    # a re-run with a working judge labels the failed ones and completes
    fake_llm.responder = lambda req: json.dumps({"explanation": "the tokens 'a' and 'b'"})
    assert _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--features", "2:8") == ExitStatus.OK
    assert q(labdb, "SELECT count(*) FROM labels") == [(6,)]


def test_nothing_labelled_is_a_failed_run_exit_1(labdb, fake_llm, capsys, prefect_server):
    fake_llm.responder = lambda req: "garbage"
    assert _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--features", "2:4") == ExitStatus.ERROR
    status, note = q(labdb, "SELECT status, error FROM runs")[0]
    assert status == "failed" and note.startswith("0 labelled, 2 failed"), note


def test_a_success_ends_the_streak():
    b = CircuitBreaker("openai:m", "http://x/v1", limit=3)
    assert b.failed("transport", "explain", "refused") is None
    assert b.failed("transport", "simulate", "refused") is None
    b.succeeded("explain")
    assert b.failed("transport", "explain", "refused") is None
    assert b.failed("parse", "simulate", "bad") is None
    assert b.failed("parse", "simulate", "bad") is None
    b.succeeded("explain")  # another purpose's answers do not end a parse streak
    assert b.failed("rate_limit", "simulate", "429") is None  # one 429, within the patience
    tripped = b.failed("parse", "simulate", "bad")
    assert tripped is not None and tripped.kind == "parse"
    with pytest.raises(type(tripped)):
        b.check()


def test_max_failures_must_be_positive(labdb, capsys):
    assert _cli(labdb, "--max-failures", "0") == ExitStatus.USAGE
    assert "--max-failures must be at least 1" in capsys.readouterr().err


def test_answers_in_flight_when_the_breaker_trips_are_ledgered_with_their_tokens(labdb, fake_llm, prefect_server):
    """The first request answers last; the others' unparseable answers trip the breaker meanwhile.
    The run waits for the one in flight, so every answer the server sent (and billed) is a ledger
    row with its tokens, none cut off as a connection error when the client closes."""
    fake_llm.responder = lambda req: "garbage"
    fake_llm.inject("slow", delay_s=1.5)
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini", "--max-failures", "3", "--concurrency", "4")
    assert rc == ExitStatus.ERROR
    billed = [r for r in fake_llm.requests_for("openai") if r.billed]
    assert any(r.fault == "slow" for r in billed)
    rows = q(labdb, "SELECT status, error, input_tokens FROM llm_calls ORDER BY created_at")
    assert not [r for r in rows if r[0] == "error"], rows
    assert len(rows) == len(billed) and all(tokens > 0 for _, _, tokens in rows), rows
