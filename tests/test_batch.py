"""The batch runner against the fake server's batch endpoints, through the real SDKs.

A toy two-step pipeline (explain, then simulate from the explanation) stands in for `label`:
its second step only exists once the first is answered, as in the real pipeline.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal

import pytest

from featurescribe.llm import CallStore, ChatRequest, make_client
from featurescribe.llm.batch import BatchOptions, BatchPending, BatchRunner, batch_discount
from featurescribe.llm.prices import PriceTable
from featurescribe.store import batches as bsql
from featurescribe.store import open_db
from tests.fake_batch import FakeBatchServer
from tests.fake_llm import point_sdks_at

SCHEMA = {"type": "object", "properties": {"explanation": {"type": "string"}},
          "required": ["explanation"], "additionalProperties": False}


@pytest.fixture
def server(monkeypatch):
    s = FakeBatchServer()
    s.start()
    point_sdks_at(monkeypatch, s)

    def responder(req):
        text = req.user_text
        if text.startswith("explain"):
            n = text.split()[-1]
            return json.dumps({"explanation": f"expl-{n}"})
        return "0 1 2 3"

    s.responder = responder
    yield s
    s.stop()


def explain_request(i: int) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": f"explain feature {i}"},),
                       purpose="explain", json_schema=SCHEMA, max_tokens=64)


async def toy_pipeline(clients, n: int) -> list[str | None]:
    client = clients["explainer"]

    async def one(i):
        try:
            expl = await client.chat(explain_request(i), parse=lambda r: r.json()["explanation"])
            sim = await client.chat(ChatRequest(
                messages=({"role": "user", "content": f"simulate {expl} on feature {i}"},),
                purpose="simulate", max_tokens=32))
            return f"{expl}|{sim.text}"
        except BatchPending:
            return None

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _nosleep(_s):
    return None


def run_batched(db_path, spec: str, n: int, **opts):
    """One `label --batch`-like run: the batch phases, then (when done) the normal pass."""
    con = open_db(db_path)
    store = CallStore(con)
    try:
        client = make_client(spec, store=store, run_id="r1")
        options = BatchOptions(poll_initial_s=0.0, progress=False, **opts)
        runner = BatchRunner(con, store, run_id="r1", options=options, sleep=_nosleep)

        async def go():
            report = await runner.run({"explainer": client}, lambda cl: toy_pipeline(cl, n))
            out = await toy_pipeline({"explainer": client}, n) if report.done else None
            await client.aclose()
            return report, out

        report, out = asyncio.run(go())
        store.flush()
        return report, out
    finally:
        store.close()
        con.close()


def chat_calls(server, api):
    return [r for r in server.requests_for(api)]


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-haiku-4-5", "anthropic")])
def test_two_phases_end_to_end_no_direct_call(server, db_path, spec, api):
    report, out = run_batched(db_path, spec, 5)
    assert report.done
    assert out == [f"expl-{i}|0 1 2 3" for i in range(5)]
    batches = server.created_batches(api)
    assert len(batches) == 2  # explain, then simulate
    assert [len(b.requests) for b in batches] == [5, 5]
    assert chat_calls(server, api) == []  # no direct (full-price) call at all
    con = open_db(db_path)
    try:
        rows = con.execute("SELECT purpose, status, batch_id, cost_usd, input_tokens, output_tokens "
                           "FROM llm_calls WHERE batch_id IS NOT NULL").fetchall()
        assert sorted(r[0] for r in rows) == ["explain"] * 5 + ["simulate"] * 5
        assert all(r[1] == "ok" for r in rows)
        backend, model = spec.split(":")
        price = PriceTable.load().lookup(backend, model)
        for _, _, _, cost, tin, tout in rows:
            assert cost == pytest.approx(price.cost(tin, tout) * 0.5)
        stored = bsql.list_batches(con)
        assert [b["status"] for b in stored] == ["collected", "collected"]
        assert {b["batch_id"] for b in stored} == {b.id for b in batches}
        # the normal pass answered everything from the cache
        assert con.execute("SELECT count(*) FROM llm_calls WHERE status = 'cached'").fetchone()[0] == 10
    finally:
        con.close()


def test_batch_discount_default_and_override(tmp_path, monkeypatch):
    assert batch_discount() == 0.5
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"batch_discount": 0.4, "models": {"openai:x": {"input": 1, "output": 2}}}))
    monkeypatch.setenv("FEATURESCRIBE_PRICES", str(p))
    assert batch_discount() == 0.4


def test_expired_batch_keeps_partial_output_and_retries_rest(server, db_path):
    server.plan(expire_after=2)  # the explain batch runs 2 of 5 requests, then expires
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 5)
    assert report.done
    assert out == [f"expl-{i}|0 1 2 3" for i in range(5)]
    batches = server.created_batches("openai")
    sizes = [len(b.requests) for b in batches]
    assert batches[0].outcome == "expired"
    # the 3 expired requests went into a new batch, beside the 2 simulations of the kept answers
    assert sizes[0] == 5 and sum(sizes) == 5 + 3 + 5
    assert chat_calls(server, "openai") == []
    con = open_db(db_path)
    try:
        rows = con.execute("SELECT status, error FROM llm_calls WHERE batch_id = ?",
                           [batches[0].id]).fetchall()
        assert sorted(r[0] for r in rows) == ["error"] * 3 + ["ok"] * 2
        assert all("expired" in r[1] for r in rows if r[0] == "error")
        items = bsql.batch_items(con, batches[0].id)
        assert sorted(i["status"] for i in items) == ["expired"] * 3 + ["succeeded"] * 2
    finally:
        con.close()
    # the two answers the expired batch finished were not asked again
    explain_ids = [r["custom_id"] for b in batches for r in b.requests
                   if "explain" in json.dumps(r["body"]["messages"])]
    assert len(explain_ids) == 5 + 3 and len(set(explain_ids)) == 5


@pytest.mark.parametrize("api,spec", [("openai", "openai:gpt-4o-mini"),
                                      ("anthropic", "anthropic:claude-haiku-4-5")])
def test_errored_and_cancelled_requests_retried(server, db_path, api, spec):
    server.plan(errors=[0, 3])
    server.plan(cancel=True)  # the retry batch is cancelled: asked once more in a third
    report, out = run_batched(db_path, spec, 4)
    assert report.done and out == [f"expl-{i}|0 1 2 3" for i in range(4)]
    batches = server.created_batches(api)
    # 2 explain retries beside 2 simulations; that batch is cancelled and sent again whole;
    # then the last 2 simulations
    assert [len(b.requests) for b in batches] == [4, 4, 4, 2]
    assert batches[1].outcome == "cancelled"
    assert chat_calls(server, api) == []
    con = open_db(db_path)
    try:
        errors = con.execute("SELECT error FROM llm_calls WHERE status = 'error' ORDER BY error").fetchall()
        kinds = sorted(e[0].split(" ")[0] for e in errors)
        assert kinds == ["canceled"] * 4 + ["errored"] * 2
    finally:
        con.close()


def test_retry_direct_uses_the_ordinary_client(server, db_path):
    server.plan(errors=[1])
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 3, retry="direct")
    assert report.done and out == [f"expl-{i}|0 1 2 3" for i in range(3)]
    direct = chat_calls(server, "openai")
    assert len(direct) == 1 and direct[0].user_text == "explain feature 1"
    assert report.n_direct == 1
    con = open_db(db_path)
    try:
        row = con.execute("SELECT status, batch_id, cost_usd FROM llm_calls WHERE batch_id IS NULL "
                          "AND status = 'ok'").fetchall()
        assert len(row) == 1  # the direct call, at the list price
    finally:
        con.close()


def test_chunks_under_the_request_limit(server, db_path):
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 7, max_requests=3)
    assert report.done and all(out)
    sizes = [len(b.requests) for b in server.created_batches("openai")]
    assert sizes == [3, 3, 1, 3, 3, 1]


def test_chunks_under_the_byte_limit(server, db_path):
    from featurescribe.llm.batch.collector import BatchCollector

    client = make_client("openai:gpt-4o-mini")
    item = BatchCollector(client, sink=None).item("k" * 64, explain_request(0))
    from featurescribe.llm.batch.openai_batch import OpenAIBatchProvider

    size = OpenAIBatchProvider.item_bytes(item)
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 5, max_bytes=2 * size + 10)
    assert report.done
    first = [b for b in server.created_batches("openai")][:3]
    assert [len(b.requests) for b in first] == [2, 2, 1]
    for b in server.created_batches("openai"):
        f = server.files[b.input_file_id]
        assert f["meta"]["bytes"] <= 2 * size + 10 + 64  # simulate lines are about as long


def test_restart_in_the_middle_of_a_batch_submits_nothing_again(server, db_path):
    server.hold = True  # batches stay in progress
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 4, wait=False)
    assert not report.done and out is None and len(report.submitted) == 1
    con = open_db(db_path)
    (row,) = bsql.open_batches(con)  # recorded as soon as it existed
    con.close()
    assert row["batch_id"] == server.created_batches()[0].id and row["n_requests"] == 4

    # the process stops; a new one starts while the batch still runs: nothing is submitted again
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 4, wait=False)
    assert not report.done and report.submitted == [] and len(server.created_batches()) == 1

    # the batch ends; the next run collects it, submits the next phase and waits for it
    server.hold = False
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 4)
    assert report.done and out == [f"expl-{i}|0 1 2 3" for i in range(4)]
    batches = server.created_batches()
    assert [len(b.requests) for b in batches] == [4, 4]
    assert chat_calls(server, "openai") == []
    con = open_db(db_path)
    try:
        assert bsql.open_batches(con) == []
        n_explain = con.execute("SELECT count(*) FROM llm_calls WHERE purpose = 'explain' AND "
                                "status = 'ok' AND batch_id IS NOT NULL").fetchone()[0]
        assert n_explain == 4  # collected once, though two runs saw the batch
    finally:
        con.close()


def test_interrupted_while_waiting_then_picked_up(server, db_path):
    """A run killed during the wait (here: the sleep raises) leaves the batch for the next run."""
    server.hold = True
    con = open_db(db_path)
    store = CallStore(con)
    client = make_client("openai:gpt-4o-mini", store=store)

    async def boom(_s):
        raise KeyboardInterrupt

    runner = BatchRunner(con, store, options=BatchOptions(progress=False), sleep=boom)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(runner.run({"explainer": client}, lambda cl: toy_pipeline(cl, 3)))
    store.close()
    con.close()
    server.hold = False
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 3)
    assert report.done and all(out)
    assert [len(b.requests) for b in server.created_batches()] == [3, 3]


def test_openai_failed_batch_is_retried(server, db_path):
    server.plan(fail=True)
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 2)
    assert report.done and all(out)
    batches = server.created_batches()
    assert batches[0].outcome == "failed" and [len(b.requests) for b in batches] == [2, 2, 2]


def test_gives_up_after_max_attempts_then_direct(server, db_path):
    for _ in range(2):
        server.plan(errors=[0])
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 1, max_attempts=2)
    assert report.done and out == ["expl-0|0 1 2 3"]
    assert len(chat_calls(server, "openai")) == 1  # after two failed batches, asked directly
    assert report.n_direct == 1


def test_budget_stops_submitting(server, db_path):
    from featurescribe.llm import Budget

    con = open_db(db_path)
    store = CallStore(con)
    budget = Budget(limit_usd=0.0)
    client = make_client("openai:gpt-4o-mini", store=store, budget=budget)
    runner = BatchRunner(con, store, budget=budget, options=BatchOptions(progress=False, poll_initial_s=0))
    report = asyncio.run(runner.run({"explainer": client}, lambda cl: toy_pipeline(cl, 2)))
    store.close()
    con.close()
    assert report.done and report.budget_stopped and server.created_batches() == []


def test_fake_server_speaks_the_sdks(server):
    """The fake endpoints as the SDKs see them: upload, create, retrieve, content, results."""
    import anthropic
    import openai

    oc = openai.OpenAI()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "explain feature 7"}]}}
    f = oc.files.create(file=("in.jsonl", io.BytesIO((json.dumps(line) + "\n").encode())), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    b = oc.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "in_progress"
    assert oc.batches.retrieve(b.id).status == "in_progress"
    b = oc.batches.retrieve(b.id)
    assert b.status == "completed" and b.request_counts.completed == 1
    out = [json.loads(x) for x in oc.files.content(b.output_file_id).text.splitlines()]
    assert out[0]["custom_id"] == "a" and out[0]["response"]["status_code"] == 200
    assert json.loads(out[0]["response"]["body"]["choices"][0]["message"]["content"]) == {
        "explanation": "expl-7"}

    ac = anthropic.Anthropic()
    mb = ac.messages.batches.create(requests=[{"custom_id": "x", "params": {
        "model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}])
    ac.messages.batches.retrieve(mb.id)
    assert ac.messages.batches.retrieve(mb.id).processing_status == "ended"
    (res,) = list(ac.messages.batches.results(mb.id))
    assert res.custom_id == "x" and res.result.type == "succeeded"
    assert [r.api for r in server.requests] == ["batch"] * len(server.requests)


def test_a_batch_that_cannot_be_polled_stops_the_run_and_stays_recorded(server, db_path):
    from featurescribe.errors import FeaturescribeError
    from featurescribe.llm.batch.openai_batch import OpenAIBatchProvider

    class Unreachable(OpenAIBatchProvider):
        def poll(self, batch_id):
            raise ConnectionError("network is down")

    con = open_db(db_path)
    store = CallStore(con)
    client = make_client("openai:gpt-4o-mini", store=store)
    runner = BatchRunner(con, store, options=BatchOptions(progress=False, poll_initial_s=0),
                         providers={"openai": Unreachable()}, sleep=_nosleep)
    with pytest.raises(FeaturescribeError, match="cannot poll openai batch .* network is down"):
        asyncio.run(runner.run({"explainer": client}, lambda cl: toy_pipeline(cl, 2)))
    assert [b["status"] for b in bsql.open_batches(con)] == ["submitted"]
    store.close()
    con.close()
    report, out = run_batched(db_path, "openai:gpt-4o-mini", 2)  # the network is back
    assert report.done and all(out) and len(server.created_batches()) == 2


async def _long_system_pipeline(clients, n: int, system: str) -> list[str | None]:
    async def one(i):
        try:
            return (await clients["explainer"].chat(ChatRequest(
                messages=({"role": "system", "content": system},
                          {"role": "user", "content": f"explain feature {i}"}),
                purpose="explain", max_tokens=32))).text
        except BatchPending:
            return None

    return list(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-sonnet-4-5", "anthropic")])
def test_prompt_cache_tokens_of_batch_answers_are_counted_and_priced(server, db_path, spec, api):
    """A batch answer's prompt-cache reads and writes are in the ledger and priced as such, as
    for a direct call (Anthropic's `input_tokens` leaves them out: the batch rows lost them)."""
    system = " ".join(f"rule{i}" for i in range(1500))  # past both providers' cache minimum
    con = open_db(db_path)
    store = CallStore(con)
    client = make_client(spec, store=store, run_id="r1")
    runner = BatchRunner(con, store, run_id="r1", sleep=_nosleep,
                         options=BatchOptions(poll_initial_s=0.0, progress=False))
    report = asyncio.run(runner.run({"explainer": client},
                                    lambda cl: _long_system_pipeline(cl, 3, system)))
    store.flush()
    assert report.done
    rows = con.execute("SELECT input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, "
                       "cost_usd FROM llm_calls WHERE batch_id IS NOT NULL").fetchall()
    store.close()
    con.close()
    sent = sorted((r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens)
                  for r in server.batch_items)
    assert sum(s[2] for s in sent) > 0  # the provider read its prompt cache
    assert sorted(r[:4] for r in rows) == sent
    price = PriceTable.load().lookup(*spec.split(":"))
    for tin, tout, read, written, cost in rows:
        assert cost == pytest.approx(price.cost(tin, tout, read, written) * 0.5)


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-haiku-4-5", "anthropic")])
def test_unreadable_result_lines_are_skipped_and_their_requests_asked_again(server, db_path, spec, api):
    """A result file with a line that is not JSON (request 1's, cut short), a line that is no
    result and one for a request the batch never had: the batch is collected (it was stuck:
    every run stopped with 'could not read the results', the paid answers never used), the
    answers that are there are kept, and only request 1 is asked again, in a new batch."""
    server.plan(garble=[1], extra_lines=["[1, 2]", json.dumps({"custom_id": "nobody", "result": {
        "type": "succeeded"}, "response": {"status_code": 200, "body": {}}})])
    report, out = run_batched(db_path, spec, 3)
    assert report.done and out == [f"expl-{i}|0 1 2 3" for i in range(3)]
    batches = server.created_batches(api)
    first_ids = [r["custom_id"] for r in batches[0].requests]
    again = [r["custom_id"] for b in batches[1:] for r in b.requests]
    assert [c for c in first_ids if c in again] == [first_ids[1]]
    assert chat_calls(server, api) == []
    con = open_db(db_path)
    try:
        items = {i["custom_id"]: i["status"] for i in bsql.batch_items(con, batches[0].id)}
        assert items[first_ids[1]] == "missing" and items[first_ids[0]] == "succeeded"
    finally:
        con.close()


def test_budget_caps_what_a_batch_may_cost(server, db_path, tmp_path, monkeypatch):
    """--budget-usd with batches: a batch is cut to the requests whose worst-case cost (estimated
    input, max_tokens output, at the batch price) fits in what is left. A whole batch went out
    while anything was left, so a run could spend many times its budget at once."""
    from featurescribe.llm import Budget

    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"openai:gpt-4o-mini": {"input": 1e5, "output": 1e5}}}))
    monkeypatch.setenv("FEATURESCRIBE_PRICES", str(prices))  # $0.05 a token at the batch price
    con = open_db(db_path)
    store = CallStore(con)
    budget = Budget(limit_usd=2.0)
    client = make_client("openai:gpt-4o-mini", store=store, budget=budget)
    runner = BatchRunner(con, store, budget=budget, sleep=_nosleep,
                         options=BatchOptions(progress=False, poll_initial_s=0))

    async def explain_all(clients):
        async def one(i):
            try:
                await clients["explainer"].chat(ChatRequest(
                    messages=({"role": "user", "content": f"explain feature {i}"},),
                    purpose="explain", max_tokens=8))
            except BatchPending:
                pass
        await asyncio.gather(*(one(i) for i in range(10)))

    report = asyncio.run(runner.run({"explainer": client}, explain_all))
    store.flush()
    spent = con.execute("SELECT sum(cost_usd) FROM llm_calls").fetchone()[0] or 0.0
    store.close()
    con.close()
    assert spent <= 2.0
    assert report.budget_stopped
    assert 0 < server.batch_item_count("openai") < 10  # what fitted was asked, in batches


@pytest.mark.parametrize("api,spec", [("openai", "openai:gpt-4o-mini"),
                                      ("anthropic", "anthropic:claude-haiku-4-5")])
@pytest.mark.parametrize("when", ["submit", "poll"])
def test_a_provider_outage_is_exit_status_1_and_a_bad_key_2(server, db_path, api, spec, when):
    """Batch endpoints that answer 503 (after the SDK's retries) stop the run as an outage, exit
    status 1 like the circuit breaker (it was 2, the status of bad input); a refused key stays 2."""
    import anthropic
    import openai

    from featurescribe.errors import FeaturescribeError
    from featurescribe.llm.batch.anthropic_batch import AnthropicBatchProvider
    from featurescribe.llm.batch.openai_batch import OpenAIBatchProvider
    from featurescribe.statuses import ExitStatus

    providers = {"openai": OpenAIBatchProvider(openai.OpenAI(max_retries=0)),
                 "anthropic": AnthropicBatchProvider(anthropic.Anthropic(max_retries=0))}

    def run_once():
        con = open_db(db_path)
        store = CallStore(con)
        client = make_client(spec, store=store)
        runner = BatchRunner(con, store, providers=providers, sleep=_nosleep,
                             options=BatchOptions(progress=False, poll_initial_s=0))
        try:
            with pytest.raises(FeaturescribeError) as info:
                asyncio.run(runner.run({"explainer": client}, lambda cl: toy_pipeline(cl, 2)))
        finally:
            store.close()
            con.close()
        return info.value

    if when == "submit":
        server.down_status = 503
    else:
        server.hold = True
        orig = providers[api].poll

        def poll_then_down(batch_id):
            server.down_status = 503
            return orig(batch_id)
        providers[api].poll = poll_then_down
    err = run_once()
    assert err.exit_code == ExitStatus.ERROR, str(err)
    server.down_status, server.hold, server.api_key = None, False, "right"
    providers[api].poll = type(providers[api]).poll.__get__(providers[api])
    err = run_once()
    assert err.exit_code == ExitStatus.USAGE and "401" in str(err)


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
def test_an_exhausted_quota_at_submit_is_exit_status_1_and_says_so(server, db_path, spec):
    """OpenAI's 429 insufficient_quota and Anthropic's 402 billing error when a batch is created:
    one line that says the account's quota is exhausted, exit status 1 as without --batch
    (Anthropic's 402 was a bad request, status 2; OpenAI's said only 'HTTP 429')."""
    from featurescribe.llm.breaker import QuotaExhausted
    from featurescribe.statuses import ExitStatus
    from tests.fake_llm import _QUOTA_ERRORS

    status, body = _QUOTA_ERRORS["quota"][spec.split(":")[0]]
    server.down_status, server.down_body = status, body
    con = open_db(db_path)
    store = CallStore(con)
    runner = BatchRunner(con, store, sleep=_nosleep, options=BatchOptions(progress=False, poll_initial_s=0))
    try:
        with pytest.raises(QuotaExhausted) as info:
            asyncio.run(runner.run({"explainer": make_client(spec, store=store)}, lambda cl: toy_pipeline(cl, 2)))
    finally:
        store.close()
        con.close()
    assert info.value.exit_code == ExitStatus.ERROR
    assert f"{spec}: could not submit a batch" in str(info.value) and "quota or billing is exhausted" in str(info.value)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_right_after_the_batch_is_created_keeps_its_id(server, db_path, signum):
    """A real SIGINT/SIGTERM sent to this process in the instant after the provider created the
    batch (before featurescribe recorded it), under the command's signal handling: the run stops
    with the batch recorded, and the next run picks it up instead of paying for a second one (the
    id was lost and the requests submitted again)."""
    import openai

    from featurescribe.interrupts import Interrupted, handling_signals
    from featurescribe.llm.batch.openai_batch import OpenAIBatchProvider

    class SignalledAfterCreate(OpenAIBatchProvider):
        def submit(self, items, metadata):
            created = super().submit(items, metadata)
            os.kill(os.getpid(), signum)  # its handler runs at once, before submit returns
            return created

    server.hold = True
    con = open_db(db_path)
    store = CallStore(con)
    runner = BatchRunner(con, store, sleep=_nosleep, providers={"openai": SignalledAfterCreate(openai.OpenAI())},
                         options=BatchOptions(progress=False, poll_initial_s=0, wait=False))
    client = make_client("openai:gpt-4o-mini", store=store)
    try:
        with handling_signals(), pytest.raises(Interrupted) as info:
            asyncio.run(runner.run({"explainer": client}, lambda cl: toy_pipeline(cl, 3)))
        assert info.value.signum == signum
        (row,) = bsql.open_batches(con)
        assert row["batch_id"] == server.created_batches()[0].id and row["n_requests"] == 3
    finally:
        store.close()
        con.close()
    report, _ = run_batched(db_path, "openai:gpt-4o-mini", 3, wait=False)
    assert report.submitted == [] and len(server.created_batches()) == 1
