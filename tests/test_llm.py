"""The LLM client layer through the real openai and anthropic SDKs, against tests/fake_llm.py.

Every fault kind ends answered or recorded as failed, nothing is paid twice, and the ledger
matches what the server saw.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from featurescribe.errors import FeaturescribeError
from featurescribe.llm import (
    Budget,
    BudgetExceeded,
    CallStore,
    ChatRequest,
    LLMAuthFailed,
    LLMCallFailed,
    MissingAPIKey,
    NotAnLLMBackend,
    PriceTable,
    UnparseableResponse,
    cache_key,
    make_client,
)
from featurescribe.llm.breaker import BackendBroken, QuotaExhausted
from featurescribe.llm.client import classify, parse_retry_after
from featurescribe.statuses import ExitStatus
from featurescribe.llm.limits import RateLimiter, TokenBucket
from tests.fake_llm import Reply, count_tokens, simple_logprobs

SCHEMA = {
    "type": "object",
    "properties": {"explanation": {"type": "string"}},
    "required": ["explanation"],
    "additionalProperties": False,
}
FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, backoff_jitter_s=0.01, timeout_s=1.0)  # the "slow" fault answers after 1.5 s
PRICES = PriceTable.load()


@pytest.fixture(autouse=True)
def _fresh_limiters(fresh_limiters):
    yield


def req(text="explain the feature", **kw) -> ChatRequest:
    return ChatRequest(messages=({"role": "system", "content": "You explain features."},
                                 {"role": "user", "content": text}), **kw)


def explanation(resp):
    return resp.json()["explanation"]


def client_for(spec, store=None, **kw):
    return make_client(spec, store=store, run_id="run-1", **{**FAST, **kw})


def run(coro):
    return asyncio.run(coro)


async def call(client, request, parse=None):
    try:
        return await client.chat(request, parse)
    finally:
        await client.aclose()


def assert_ledger_matches(rows, server_requests, spec):
    """One ledger row per request the server saw, in order, with its outcome and its tokens."""
    backend, model = spec.split(":", 1)
    sent = [r for r in rows if r["status"] not in ("cached", "budget")]
    assert len(sent) == len(server_requests)
    for row, sreq in zip(sent, server_requests):
        assert (row["backend"], row["model"]) == (backend, model)
        if sreq.fault in ("slow", "disconnect"):
            assert row["status"] == "error"
            assert row["input_tokens"] == 0 and row["cost_usd"] == 0
        elif sreq.status != 200:
            assert row["status"] == "error"
            assert str(sreq.status) in row["error"]
            assert row["input_tokens"] == row["output_tokens"] == 0 and row["cost_usd"] == 0
        else:  # billed: the ledger has what the server billed, at the table's price
            assert row["status"] in ("ok", "parse_error")
            assert row["status"] == ("parse_error" if sreq.fault in ("malformed", "truncated") else "ok")
            assert (row["input_tokens"], row["output_tokens"]) == (sreq.input_tokens, sreq.output_tokens)
            price = PRICES.lookup(backend, model)
            assert row["cost_usd"] == pytest.approx(price.cost(sreq.input_tokens, sreq.output_tokens))
    assert [r["attempt"] for r in sent] == list(range(1, len(sent) + 1))


# ---------------------------------------------------------------------------------------------
# every fault kind, both providers


FAULTS = [
    ("429", {"retry_after": 0}),
    ("429", {"retry_after": None, "retry_after_ms": 50}),
    ("500", {}),
    ("503", {}),
    ("529", {}),
    ("slow", {"delay_s": 1.5}),
    ("disconnect", {}),
    ("malformed", {}),
    ("truncated", {}),
]


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
@pytest.mark.parametrize("kind,opts", FAULTS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(FAULTS)])
def test_each_fault_is_answered_once_paid_and_ledgered(fake_llm, store, spec, kind, opts):
    fake_llm.responder = lambda r: json.dumps({"explanation": "closing brackets"})
    fake_llm.inject(kind, **opts)
    client = client_for(spec, store)
    value = run(call(client, req(json_schema=SCHEMA), explanation))
    assert value == "closing brackets"
    served = fake_llm.requests
    assert len(served) == 2 and served[0].fault == kind and served[1].fault is None
    rows = store.rows()
    assert [r["status"] for r in rows][-1] == "ok"
    assert_ledger_matches(rows, served, spec)
    # one successful answer, paid once: exactly one ok row, and a re-run is a cache hit
    assert sum(r["status"] == "ok" for r in rows) == 1
    again = run(call(client_for(spec, store), req(json_schema=SCHEMA), explanation))
    assert again == "closing brackets"
    assert len(fake_llm.requests) == 2
    assert store.rows()[-1]["status"] == "cached"


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
def test_many_faults_in_one_call_then_answer(fake_llm, store, spec):
    for kind, opts in [("429", {"retry_after": 0}), ("500", {}), ("529", {}), ("malformed", {}),
                       ("disconnect", {}), ("truncated", {})]:
        fake_llm.inject(kind, **opts)
    client = client_for(spec, store)
    resp = run(call(client, req(json_schema=SCHEMA)))
    assert resp.json() == {"explanation": "ok"}
    assert resp.attempts == 7
    assert_ledger_matches(store.rows(), fake_llm.requests, spec)
    # the paid total of the ledger is what the server billed (no attempt paid twice)
    total = sum(r["cost_usd"] for r in store.rows())
    price = PRICES.lookup(*spec.split(":", 1))
    assert total == pytest.approx(price.cost(fake_llm.billed_input_tokens, fake_llm.billed_output_tokens))


@pytest.mark.parametrize("kind,opts", [("429", {"retry_after": 0}), ("500", {}), ("slow", {"delay_s": 1.5}),
                                       ("disconnect", {}), ("truncated", {})])
def test_aiohttp_stack_retries_and_ledgers_alike(fake_llm, store, kind, opts):
    """FEATURESCRIBE_LLM_HTTP=aiohttp (the openai SDK's aiohttp transport): same answers, retries
    and ledger rows as the default httpx stack."""
    pytest.importorskip("aiohttp")
    spec = "openai:gpt-4o-mini"
    fake_llm.responder = lambda r: json.dumps({"explanation": "closing brackets"})
    fake_llm.inject(kind, **opts)
    client = client_for(spec, store, http="aiohttp")
    assert client.settings.http == "aiohttp"
    assert run(call(client, req(json_schema=SCHEMA), explanation)) == "closing brackets"
    assert len(fake_llm.requests) == 2 and fake_llm.requests[0].fault == kind
    assert_ledger_matches(store.rows(), fake_llm.requests, spec)
    if kind == "slow":
        assert "timeout" in store.rows()[0]["error"]


def test_unknown_http_stack_is_refused(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(FeaturescribeError, match="HTTP stack"):
        make_client("openai:gpt-4o-mini", http="curl")


def test_sdk_does_not_retry_by_itself(fake_llm, store):
    fake_llm.inject("500")
    client = client_for("openai:gpt-4o-mini", store, server_attempts=1)
    with pytest.raises(LLMCallFailed, match="HTTP 500"):
        run(call(client, req()))
    assert len(fake_llm.requests) == 1
    assert [r["status"] for r in store.rows()] == ["error"]


@pytest.mark.parametrize("kind", ["500", "529", "429", "disconnect"])
def test_retries_run_out_and_the_call_is_recorded_failed(fake_llm, con, store, kind):
    fake_llm.inject(kind, times=10, retry_after=0)
    client = client_for("anthropic:claude-haiku-4-5", store, server_attempts=3, transport_attempts=3,
                        rate_limit_attempts=3)
    with pytest.raises(LLMCallFailed, match="after 3 attempt"):
        run(call(client, req()))
    assert len(fake_llm.requests) == 3
    rows = store.rows()
    assert [r["status"] for r in rows] == ["error"] * 3
    assert_ledger_matches(rows, fake_llm.requests, "anthropic:claude-haiku-4-5")
    store.flush()
    assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0  # failures are not cached


def test_timeout_is_retried_as_transport_failure(fake_llm, store):
    fake_llm.inject("slow", delay_s=8.0)
    t0 = time.monotonic()
    resp = run(call(client_for("openai:gpt-4o-mini", store, timeout_s=0.3), req()))
    assert resp.text == "ok"
    assert time.monotonic() - t0 < 6  # it did not wait for the slow answer
    rows = store.rows()
    assert rows[0]["status"] == "error" and "timeout" in rows[0]["error"]


def test_retry_after_is_honoured(fake_llm, store):
    fake_llm.inject("429", retry_after=1)
    t0 = time.monotonic()
    resp = run(call(client_for("openai:gpt-4o-mini", store), req()))
    assert resp.text == "ok"
    first, second = fake_llm.requests
    assert second.started_at - first.started_at >= 0.95
    assert time.monotonic() - t0 >= 0.95
    assert "429" in store.rows()[0]["error"]


def test_retry_after_ms_is_honoured(fake_llm, store):
    fake_llm.inject("429", retry_after=None, retry_after_ms=400)
    run(call(client_for("anthropic:claude-haiku-4-5", store), req()))
    first, second = fake_llm.requests
    assert second.started_at - first.started_at >= 0.38


def test_parse_failures_are_asked_again_then_fail(fake_llm, store):
    fake_llm.inject("malformed", times=5)
    client = client_for("openai:gpt-4o-mini", store, max_parse_retries=2)
    with pytest.raises(LLMCallFailed, match="3 parse failure"):
        run(call(client, req(json_schema=SCHEMA), explanation))
    rows = store.rows()
    assert [r["status"] for r in rows] == ["parse_error"] * 3
    assert all(r["input_tokens"] > 0 and r["cost_usd"] > 0 for r in rows)  # billed answers
    assert_ledger_matches(rows, fake_llm.requests, "openai:gpt-4o-mini")


def test_callers_parse_function_decides(fake_llm, store):
    answers = iter(["the feature fires on", "EXPLANATION: closing brackets"])
    fake_llm.responder = lambda r: next(answers)

    def parse(resp):
        if not resp.text.startswith("EXPLANATION:"):
            raise UnparseableResponse("no EXPLANATION: line")
        return resp.text.split(":", 1)[1].strip()

    value = run(call(client_for("anthropic:claude-haiku-4-5", store), req(), parse))
    assert value == "closing brackets"
    rows = store.rows()
    assert [r["status"] for r in rows] == ["parse_error", "ok"]
    assert rows[0]["error"] == "no EXPLANATION: line"


def test_a_broken_parse_function_is_recorded_and_raised(fake_llm, store):
    def broken(resp):
        return resp.json()["missing"]

    with pytest.raises(KeyError):
        run(call(client_for("openai:gpt-4o-mini", store), req(json_schema=SCHEMA), broken))
    rows = store.rows()
    assert len(rows) == 1 and rows[0]["status"] == "parse_error" and rows[0]["cost_usd"] > 0
    assert "KeyError" in rows[0]["error"]


def test_cancelled_call_keeps_its_row(fake_llm, store):
    fake_llm.latency_s = 3.0
    client = client_for("openai:gpt-4o-mini", store, timeout_s=30)

    async def go():
        task = asyncio.ensure_future(client.chat(req()))
        for _ in range(200):  # until the server holds the request
            if fake_llm.requests:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()

    run(go())
    rows = store.rows()
    assert [(r["status"], r["error"]) for r in rows] == [("error", "cancelled")]
    assert len(fake_llm.requests) == 1


def test_truncated_answer_is_asked_again_with_more_tokens(fake_llm, store):
    fake_llm.inject("truncated")
    run(call(client_for("openai:gpt-4o-mini", store), req(max_tokens=100)))
    first, second = fake_llm.requests
    assert first.max_tokens == 100 and second.max_tokens == 200
    assert "max_tokens" in store.rows()[0]["error"]


def test_bad_request_is_not_retried(fake_llm, store):
    fake_llm.inject("400")
    with pytest.raises(LLMCallFailed, match="HTTP 400"):
        run(call(client_for("openai:gpt-4o-mini", store), req()))
    assert len(fake_llm.requests) == 1


def test_rejected_key_stops_with_a_clear_error(fake_llm, store):
    fake_llm.inject("401")
    with pytest.raises(LLMAuthFailed) as info:
        run(call(client_for("anthropic:claude-haiku-4-5", store), req()))
    assert isinstance(info.value, FeaturescribeError) and info.value.exit_code == ExitStatus.USAGE
    assert "refused the API key" in str(info.value)
    assert len(fake_llm.requests) == 1


@pytest.mark.parametrize("spec,kind", [("openai:gpt-4o-mini", "quota"), ("anthropic:claude-haiku-4-5", "quota"),
                                       ("anthropic:claude-haiku-4-5", "spend_limit"),
                                       ("anthropic:claude-haiku-4-5", "low_credit")])
def test_an_exhausted_quota_stops_at_the_first_answer(fake_llm, store, spec, kind):
    """OpenAI's 429 insufficient_quota, Anthropic's 402 billing error and its 429 spend limit are
    not rate limits: asking again cannot help, so the first one stops the backend (it was retried
    8 times per call, on every feature)."""
    fake_llm.inject(kind, times=20)
    client = client_for(spec, store)

    async def go():
        errors = []
        for text in ("first", "second"):
            try:
                await client.chat(req(text))
            except Exception as err:  # noqa: BLE001 - both calls are looked at below
                errors.append(err)
        await client.aclose()
        return errors

    first, second = run(go())
    assert isinstance(first, QuotaExhausted) and first.exit_code == ExitStatus.ERROR
    assert str(first).startswith(f"{spec} at ") and "quota or billing is exhausted" in str(first), str(first)
    assert second is first  # the next call is refused before it is sent
    assert len(fake_llm.requests) == 1
    rows = store.rows()
    assert [r["status"] for r in rows] == ["error"] and rows[0]["cost_usd"] == 0  # not billed
    assert_ledger_matches(rows, fake_llm.requests, spec)


@pytest.mark.parametrize("retry_after", [None, 0.05])
def test_429s_on_every_request_trip_the_breaker_once_they_last(fake_llm, store, retry_after):
    """A provider that rate-limits every request (a daily cap reached) stops the run: --max-failures
    429s in a row that lasted the patience trip the breaker, instead of each call's 8 attempts on
    every feature. With Retry-After on each (0.05) they were never counted at all. Nothing of it
    is billed."""
    fake_llm.inject("429", times=1000, retry_after=retry_after)
    client = client_for("openai:gpt-4o-mini", store, max_failures=4, rate_limit_patience_s=0.3,
                        rate_limit_attempts=1000, concurrency=2)

    async def go():
        results = await asyncio.gather(*(client.chat(req(f"feature {i}")) for i in range(3)),
                                       return_exceptions=True)
        await client.aclose()
        return results

    t0 = time.monotonic()
    results = run(go())
    assert all(isinstance(r, BackendBroken) and r.kind == "rate_limit" for r in results), results
    assert "rate limits (429)" in str(results[0])
    assert time.monotonic() - t0 >= 0.3  # not before the streak lasted the patience
    rows = store.rows()
    assert len(rows) == len(fake_llm.requests) >= 4
    assert all(r["status"] == "error" and r["cost_usd"] == 0 for r in rows)


def test_a_short_burst_of_429s_waits_and_succeeds(fake_llm, store):
    """More 429s in a row than --max-failures, but shorter than the patience: the calls wait and
    are answered; only the answers are billed."""
    fake_llm.inject("429", times=6, retry_after=None)
    client = client_for("openai:gpt-4o-mini", store, max_failures=2, rate_limit_patience_s=30, concurrency=2)

    async def go():
        results = await asyncio.gather(*(client.chat(req(f"feature {i}")) for i in range(3)))
        await client.aclose()
        return results

    assert [r.text for r in run(go())] == ["ok"] * 3
    rows = store.rows()
    assert sorted(r["status"] for r in rows) == ["error"] * 6 + ["ok"] * 3
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sum(
        PRICES.lookup("openai", "gpt-4o-mini").cost(r.input_tokens, r.output_tokens)
        for r in fake_llm.requests if r.billed))


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_hit_makes_no_request(fake_llm, store):
    spec = "openai:gpt-4o-mini"
    first = run(call(client_for(spec, store), req(json_schema=SCHEMA)))
    assert not first.cached and len(fake_llm.requests) == 1
    second = run(call(client_for(spec, store), req(json_schema=SCHEMA)))
    assert second.cached and second.text == first.text
    assert len(fake_llm.requests) == 1
    rows = store.rows()
    assert [r["status"] for r in rows] == ["ok", "cached"]
    cached = rows[1]
    assert cached["cost_usd"] == 0 and cached["cached"] is True
    assert cached["prompt_hash"] == rows[0]["prompt_hash"] == cache_key("openai", "gpt-4o-mini", req(json_schema=SCHEMA))
    # anything that changes the answer changes the key
    run(call(client_for(spec, store), req(json_schema=SCHEMA, seed=1)))
    run(call(client_for(spec, store), req(json_schema=SCHEMA, temperature=0.5)))
    run(call(client_for("openai:gpt-4.1-nano", store), req(json_schema=SCHEMA)))
    assert len(fake_llm.requests) == 4


def test_the_same_request_twice_at_once_is_paid_once(fake_llm, store):
    """Two identical requests in flight together (two candidates that wrote the same
    explanation, simulated on the same windows): one goes to the provider, the other takes its
    answer from the cache. Different requests do not wait for each other."""
    fake_llm.latency_s = 0.3
    client = client_for("openai:gpt-4o-mini", store, concurrency=4)

    async def go():
        try:
            return await asyncio.gather(client.chat(req("same")), client.chat(req("same")), client.chat(req("other")))
        finally:
            await client.aclose()

    a, b, other = run(go())
    assert a.text == b.text and [a.cached, b.cached] == [False, True]
    same, other = sorted(fake_llm.requests, key=lambda r: r.user_text != "same")
    assert (same.user_text, other.user_text) == ("same", "other")
    assert other.started_at < same.finished_at  # 'other' did not wait
    assert sorted(r["status"] for r in store.rows()) == ["cached", "ok", "ok"]


def test_no_cache_bypasses_reading_but_still_writes(fake_llm, store):
    spec = "anthropic:claude-haiku-4-5"
    run(call(client_for(spec, store, use_cache=False), req()))
    run(call(client_for(spec, store, use_cache=False), req()))
    assert len(fake_llm.requests) == 2
    assert run(call(client_for(spec, store), req())).cached
    assert len(fake_llm.requests) == 2


def test_cached_answer_the_parser_rejects_is_asked_again(fake_llm, store):
    spec = "openai:gpt-4o-mini"
    run(call(client_for(spec, store), req()))

    def strict(resp):
        if resp.text != "fresh":
            raise UnparseableResponse("stale")
        return resp.text

    fake_llm.responder = lambda r: "fresh"
    assert run(call(client_for(spec, store), req(), strict)) == "fresh"
    assert len(fake_llm.requests) == 2


def test_cache_survives_reopening_the_database(fake_llm, db_path):
    from featurescribe.store import open_db

    con = open_db(db_path)
    s = CallStore(con)
    run(call(client_for("openai:gpt-4o-mini", s), req()))
    s.close()
    con.close()
    con = open_db(db_path)
    s = CallStore(con)
    assert run(call(client_for("openai:gpt-4o-mini", s), req())).cached
    s.close()
    con.close()
    assert len(fake_llm.requests) == 1


def test_cache_lookups_see_every_writer(db_path):
    """A store answers misses from its index of the file's keys; keys written by another process
    before, and by other stores or a worker's MemoryCallStore of this process after, are found."""
    import subprocess
    import sys

    from featurescribe.store import open_db
    from featurescribe.store.memory_calls import MemoryCallStore

    code = ("from featurescribe.store import open_db; from featurescribe.store.llm_calls import CallStore; "
            f"con = open_db({db_path!r}); s = CallStore(con); "
            "s.put_cached('from-another-process', 'openai', 'm', {'text': 'a'}); s.close(); con.close()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    con = open_db(db_path)
    s = CallStore(con)
    try:
        assert s.get_cached("never-written") is None  # reads the index
        assert s.get_cached("from-another-process") == {"text": "a"}
        other = CallStore(con)
        other.put_cached("from-another-store", "openai", "m", {"text": "b"})
        other.close()
        worker = MemoryCallStore()
        worker.put_cached("from-a-worker", "openai", "m", {"text": "c"})
        w = con.cursor()
        w.execute("BEGIN TRANSACTION")
        worker.flush_to(w)
        w.execute("COMMIT")
        w.close()
        assert s.get_cached("from-another-store") == {"text": "b"}
        assert s.get_cached("from-a-worker") == {"text": "c"}
        assert s.get_cached("never-written") is None
    finally:
        s.close()
        con.close()


# ---------------------------------------------------------------------------------------------
# budget


def test_budget_stops_new_calls(fake_llm, store):
    # gpt-4o-mini: $0.15 per 1M input tokens; every answer bills 1M input tokens
    fake_llm.responder = lambda r: Reply("ok", input_tokens=1_000_000, output_tokens=0)
    budget = Budget(limit_usd=0.20)
    client = client_for("openai:gpt-4o-mini", store, budget=budget)

    async def go():
        out = []
        for i in range(4):
            try:
                out.append((await client.chat(req(f"feature {i}"))).text)
            except BudgetExceeded as err:
                out.append(str(err))
        await client.aclose()
        return out

    out = run(go())
    assert out[:2] == ["ok", "ok"]
    assert out[2] == out[3] == "stopped at budget $0.20 (spent $0.3000)"
    assert len(fake_llm.requests) == 2
    assert budget.spent_usd == pytest.approx(0.30)
    assert budget.stopped_message() == "stopped at budget $0.20 (spent $0.3000); 2 call(s) not started"
    rows = store.rows()
    assert [r["status"] for r in rows] == ["ok", "ok", "budget", "budget"]
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(0.30)


def test_calls_in_flight_finish_when_the_budget_runs_out(fake_llm, store):
    fake_llm.latency_s = 0.2
    fake_llm.responder = lambda r: Reply("ok", input_tokens=1_000_000, output_tokens=0)
    budget = Budget(limit_usd=0.10)
    client = client_for("openai:gpt-4o-mini", store, budget=budget, concurrency=8)

    async def go():
        first = await asyncio.gather(*(client.chat(req(f"f{i}")) for i in range(5)), return_exceptions=True)
        later = await asyncio.gather(client.chat(req("later")), return_exceptions=True)
        await client.aclose()
        return first, later

    first, later = run(go())
    assert all(r.text == "ok" for r in first)  # all started before any spend: all finish
    assert isinstance(later[0], BudgetExceeded)
    assert len(fake_llm.requests) == 5
    assert [r["status"] for r in store.rows()].count("ok") == 5
    assert budget.spent_usd == pytest.approx(0.75)


def test_cached_answers_cost_nothing_against_the_budget(fake_llm, store):
    fake_llm.responder = lambda r: Reply("ok", input_tokens=1_000_000, output_tokens=0)
    run(call(client_for("openai:gpt-4o-mini", store), req()))
    budget = Budget(limit_usd=0.0)  # a spent budget still serves the cache
    assert run(call(client_for("openai:gpt-4o-mini", store, budget=budget), req())).cached
    assert budget.spent_usd == 0


# ---------------------------------------------------------------------------------------------
# limits


def test_concurrency_limit_is_respected(fake_llm, store):
    fake_llm.latency_s = 0.05
    client = client_for("openai:gpt-4o-mini", store, concurrency=4)

    async def go():
        out = await asyncio.gather(*(client.chat(req(f"f{i}")) for i in range(24)))
        await client.aclose()
        return out

    assert len(run(go())) == 24
    assert fake_llm.max_in_flight == 4


def test_many_calls_at_once(fake_llm, store):
    fake_llm.latency_s = 0.1
    client = client_for("anthropic:claude-haiku-4-5", store, concurrency=200, timeout_s=10)

    async def go():
        out = await asyncio.gather(*(client.chat(req(f"f{i}")) for i in range(200)))
        await client.aclose()
        return out

    out = run(go())
    assert len(out) == 200 and fake_llm.max_in_flight > 50  # many at once, not one by one
    assert len(store.rows()) == 200


def test_rpm_bucket_spaces_requests():
    b = TokenBucket(per_minute=60, burst_s=2)  # 1 a second, bursts of 2
    waits = [b.reserve(1) for _ in range(4)]
    assert waits[0] == 0 and waits[1] == 0
    assert waits[2] == pytest.approx(1.0, abs=0.05) and waits[3] == pytest.approx(2.0, abs=0.05)


def test_tpm_limit_and_settle():
    lim = RateLimiter(tpm=6000)  # 100 tokens a second, 1000 burst

    async def go():
        t0 = time.monotonic()
        await lim.acquire(1000)
        await lim.acquire(20)  # over the burst: waits about 0.2 s
        return time.monotonic() - t0

    assert 0.15 < asyncio.run(go()) < 3
    before = lim.tpm.tokens
    lim.settle(1000, 100)  # the request used fewer tokens than reserved: given back
    assert lim.tpm.tokens > before


def test_a_429_pauses_every_client_of_the_model(fake_llm, store):
    fake_llm.inject("429", retry_after=0.6)
    a = client_for("openai:gpt-4o-mini", store)
    b = client_for("openai:gpt-4o-mini", store)

    async def go():
        await a.chat(req("first"))
        t0 = time.monotonic()
        await b.chat(req("second"))  # another client of the same model waits out the pause
        took = time.monotonic() - t0
        await a.aclose()
        await b.aclose()
        return took

    asyncio.run(go())
    starts = [r.started_at for r in fake_llm.requests]
    assert starts[1] - starts[0] >= 0.55
    assert a.limiter is b.limiter


def test_client_serves_several_event_loops(fake_llm, store):
    client = client_for("openai:gpt-4o-mini", store)
    assert run(client.chat(req("one"))).text == "ok"
    assert run(client.chat(req("two"))).text == "ok"  # a new loop: a new HTTP pool
    assert len(fake_llm.requests) == 2


# ---------------------------------------------------------------------------------------------
# logprobs, structured output


def test_logprobs_come_through(fake_llm, store):
    fake_llm.responder = lambda r: Reply("5 3 0", logprobs=simple_logprobs("5 3 0", top=3))
    client = client_for("openai:gpt-4o-mini", store)
    assert client.supports_logprobs
    resp = run(call(client, req(top_logprobs=3)))
    sent = fake_llm.requests[0]
    assert sent.logprobs_asked and sent.top_logprobs == 3
    assert [t.token for t in resp.logprobs] == ["5", " 3", " 0"]
    assert len(resp.logprobs[0].top) == 3
    assert resp.logprobs[0].top["5"] == pytest.approx(-0.01)
    # and from the cache, the same
    again = run(call(client_for("openai:gpt-4o-mini", store), req(top_logprobs=3)))
    assert again.cached and again.logprobs[1].top == resp.logprobs[1].top


def test_server_without_logprobs_is_noticed(fake_llm, store):
    client = client_for("openai:my-local-model", store)  # a non-OpenAI base URL: assumed until seen
    assert client.supports_logprobs
    resp = run(call(client, req(top_logprobs=2)))
    assert resp.logprobs is None
    assert not client.supports_logprobs
    run(call(client, req("next", top_logprobs=2)))
    assert not fake_llm.requests[1].logprobs_asked


def test_openai_structured_output_request(fake_llm, store):
    run(call(client_for("openai:gpt-4o-mini", store), req(json_schema=SCHEMA, seed=7)))
    body = fake_llm.requests[0].body
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["seed"] == 7 and body["temperature"] == 0.0
    assert fake_llm.requests[0].headers["authorization"] == "Bearer test-key"


def test_anthropic_structured_output(fake_llm, store):
    fake_llm.responder = lambda r: json.dumps({"explanation": "the word 'the'"})
    resp = run(call(client_for("anthropic:claude-haiku-4-5", store), req(json_schema=SCHEMA)))
    assert resp.json() == {"explanation": "the word 'the'"}
    sent = fake_llm.requests[0]
    assert sent.body["tool_choice"] == {"type": "tool", "name": "answer"}
    assert sent.body["tools"][0]["input_schema"] == SCHEMA
    assert sent.body["system"] == [{"type": "text", "text": "You explain features.",
                                    "cache_control": {"type": "ephemeral"}}]
    assert [m["role"] for m in sent.body["messages"]] == ["user"]
    # older SDKs send x-api-key, newer ones a bearer token
    assert "test-key" in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "").removeprefix("Bearer "))
    assert "anthropic-version" in sent.headers
    assert resp.finish_reason == "tool_use"


def test_anthropic_structured_output_non_object_schema(fake_llm, store):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}}
    fake_llm.responder = lambda r: json.dumps({"value": [0, 3, 10]})
    resp = run(call(client_for("anthropic:claude-haiku-4-5", store), req(json_schema=schema)))
    assert resp.json() == [0, 3, 10]
    assert fake_llm.requests[0].body["tools"][0]["input_schema"]["properties"]["value"] == schema


def test_anthropic_answer_without_the_tool_is_asked_again(fake_llm, store):
    fake_llm.inject("malformed")  # a text block instead of the tool call
    resp = run(call(client_for("anthropic:claude-haiku-4-5", store), req(json_schema=SCHEMA)))
    assert resp.json() == {"explanation": "ok"}
    assert [r["status"] for r in store.rows()] == ["parse_error", "ok"]


# ---------------------------------------------------------------------------------------------
# keys, specs, prices, ledger


def test_missing_openai_key_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MissingAPIKey, match="^OPENAI_API_KEY is not set; "):
        make_client("openai:gpt-4o-mini")
    assert issubclass(MissingAPIKey, FeaturescribeError)


def test_missing_anthropic_key_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with pytest.raises(MissingAPIKey, match="^ANTHROPIC_API_KEY is not set; "):
        make_client("anthropic:claude-haiku-4-5")


def test_local_openai_compatible_server_needs_no_key(fake_llm, store, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    client = client_for("openai:qwen2.5:0.5b", store)  # e.g. Ollama's model names
    assert run(call(client, req())).text == "ok"
    assert fake_llm.requests[0].model == "qwen2.5:0.5b"
    assert "max_tokens" in fake_llm.requests[0].body  # what local servers understand


@pytest.mark.parametrize("spec", ["baseline:tokens", "lexical", "gemini:pro", "openai:"])
def test_non_llm_specs_are_refused(spec):
    with pytest.raises(NotAnLLMBackend):
        make_client(spec)


def test_check_backend_before_work(monkeypatch):
    from featurescribe.llm import check_backend

    check_backend("baseline:tokens")
    check_backend("lexical")
    with pytest.raises(FeaturescribeError, match="unknown model"):
        check_backend("local:no-such-model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MissingAPIKey):
        check_backend("openai:gpt-4o-mini")


def test_baseline_error_says_what_it_is():
    with pytest.raises(NotAnLLMBackend, match="not an LLM backend"):
        make_client("baseline:tokens")


def test_price_table():
    t = PriceTable.load()
    assert t.lookup("openai", "gpt-4o-mini").input == 0.15
    assert t.lookup("openai", "gpt-4o-2024-08-06") == t.lookup("openai", "gpt-4o")
    assert t.lookup("openai", "gpt-4o-mini-2024-07-18") == t.lookup("openai", "gpt-4o-mini")
    assert t.lookup("anthropic", "claude-sonnet-4-5-20250929").output == 15.0
    assert t.lookup("local", "smollm2-135m").cost(10**6, 10**6) == 0
    assert t.lookup("openai", "no-such-model") is None
    cost, note = t.cost("openai", "no-such-model", 10, 10)
    assert cost == 0 and "no price" in note


def test_price_override(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"openai:gpt-4o-mini": {"input": 1.0, "output": 2.0},
                                           "my-model": {"input": 3.0, "output": 0}}}))
    monkeypatch.setenv("FEATURESCRIBE_PRICES", str(path))
    t = PriceTable.load()
    assert t.lookup("openai", "gpt-4o-mini").input == 1.0
    assert t.lookup("openai", "my-model").input == 3.0
    assert t.lookup("openai", "gpt-4o").input == 2.5  # the rest stays
    path.write_text("{not json")
    with pytest.raises(FeaturescribeError, match="cannot read price file"):
        PriceTable.load()


def test_unknown_model_costs_zero_with_a_note(fake_llm, store):
    run(call(client_for("openai:mystery-model", store), req()))
    row = store.rows()[0]
    assert row["status"] == "ok" and row["cost_usd"] == 0
    assert "no price for openai:mystery-model" in row["error"]


def test_ledger_rows_carry_run_purpose_and_latency(fake_llm, store):
    fake_llm.latency_s = 0.05
    run(call(client_for("openai:gpt-4o-mini", store), req(purpose="explain")))
    row = store.rows()[0]
    assert row["run_id"] == "run-1" and row["purpose"] == "explain"
    assert row["latency_s"] >= 0.05 and row["created_at"] is not None
    sent = fake_llm.requests[0]
    assert row["input_tokens"] == sum(count_tokens(m["content"]) for m in sent.messages) + 3 * len(sent.messages)


def test_ledger_sql_spend_per_run_and_model(fake_llm, con, store):
    run(call(client_for("openai:gpt-4o-mini", store), req("a")))
    run(call(make_client("anthropic:claude-haiku-4-5", store=store, run_id="run-2", **FAST), req("b")))
    store.flush()
    got = con.execute(
        """SELECT run_id, backend || ':' || model AS model, count(*) AS calls,
                  count(*) FILTER (WHERE status = 'cached') AS cached,
                  sum(input_tokens) AS tokens_in, sum(output_tokens) AS tokens_out,
                  round(sum(cost_usd), 6) AS usd
           FROM llm_calls GROUP BY ALL ORDER BY usd DESC"""
    ).fetchall()
    assert [(r[0], r[1], r[2]) for r in got] == [("run-2", "anthropic:claude-haiku-4-5", 1),
                                                  ("run-1", "openai:gpt-4o-mini", 1)]


def test_memory_store_defers_rows_to_the_writer(fake_llm, con):
    from featurescribe.llm import MemoryCallStore, load_cache

    mem = MemoryCallStore()
    run(call(client_for("openai:gpt-4o-mini", mem), req()))
    assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 0
    con.execute("BEGIN TRANSACTION")
    assert mem.flush_to(con) == 1
    con.execute("COMMIT")
    assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 1
    seeded = MemoryCallStore(cache=load_cache(con))
    assert run(call(client_for("openai:gpt-4o-mini", seeded), req())).cached
    assert len(fake_llm.requests) == 1


def test_no_store_keeps_rows_on_the_client(fake_llm):
    client = client_for("openai:gpt-4o-mini")
    run(call(client, req()))
    assert [r.status for r in client.ledger] == ["ok"]
    assert client.spent_usd > 0


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None


def test_classify_plain_errors():
    assert classify(asyncio.TimeoutError(), 3).kind == "transport"
    assert classify(ValueError("bug")) is None


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-sonnet-4-5"])
def test_provider_prompt_cache_tokens_are_ledgered_and_priced_as_such(fake_llm, store, spec):
    """A long shared prefix (system prompt) sent twice: the provider reports the second as read
    from its prompt cache (OpenAI automatically, Anthropic for the `cache_control` system block
    and a first write), the ledger keeps those tokens and prices them at the cache's prices."""
    from featurescribe.llm.prices import PriceTable

    prefix = " ".join(f"w{i}" for i in range(1500))
    price = PriceTable.load().lookup(*spec.split(":"))
    rows = []
    for i in range(2):
        request = ChatRequest(messages=({"role": "system", "content": prefix},
                                        {"role": "user", "content": f"question {i}"}), purpose="explain")
        run(call(client_for(spec, store, use_cache=False), request))
        rows.append(store.rows()[-1])
    rec = fake_llm.requests
    assert [r["input_tokens"] for r in rows] == [r.input_tokens for r in rec]
    if spec.startswith("openai"):
        assert rows[0]["cached_input_tokens"] == 0
        assert rows[1]["cached_input_tokens"] == 1408  # 1,024 + 3 x 128 of the 1,500 shared words
        assert rows[1]["cache_write_tokens"] == 0
    else:
        assert rec[0].body["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert (rows[0]["cached_input_tokens"], rows[0]["cache_write_tokens"]) == (0, 1500)
        assert (rows[1]["cached_input_tokens"], rows[1]["cache_write_tokens"]) == (1500, 0)
        assert rec[1].response["usage"]["input_tokens"] == rec[1].input_tokens - 1500
    for r in rows:
        want = price.cost(r["input_tokens"], r["output_tokens"], r["cached_input_tokens"], r["cache_write_tokens"])
        assert r["cost_usd"] == pytest.approx(want)
    assert rows[1]["cost_usd"] < rows[0]["cost_usd"]
    assert price.cached_input is not None and price.cached_input < price.input
