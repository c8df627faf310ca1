"""`featurescribe label --batch` end to end: the real command, the real SDKs, the tests' server.

A small synthetic source (tests.test_sampling.build_db) is labelled with an OpenAI or Anthropic
explainer and simulator. Every LLM request must go through the provider's batch endpoints (no
direct chat call at all), the labels must be written, and the ledger must show batch prices.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from featurescribe.cli import main
from featurescribe.llm.prices import PriceTable
from featurescribe.store import batches as bsql
from featurescribe.store import open_db
from tests.fake_batch import FakeBatchServer
from tests.fake_llm import point_sdks_at
from tests.test_sampling import SOURCE, build_db
from tests.test_simulators import _shown_tokens, activations_answer, logprob_reply

FEATURES = "2:6"  # feature 2 is planted on " def"/" class"/" return"; 3..5 fire at random


def responder(req):
    text = req.user_text
    schema = req.json_schema or {}
    if "explanation" in json.dumps(schema.get("properties", {})):
        tag = hashlib.sha256(text.encode()).hexdigest()[:6]  # a different text per feature
        return json.dumps({"explanation": f'the keywords "def", "class" and "return" ({tag})'})
    if "activations" in json.dumps(schema):  # structured simulation (Anthropic)
        return activations_answer(text, lambda t: 3)
    # logprob simulation (OpenAI): copy the token lines, a number after each
    lines = _shown_tokens(text)
    dists = [{"0": 0.6, "5": 0.3, "10": 0.1} for _ in lines]
    return logprob_reply(lines, dists)


@pytest.fixture
def server(monkeypatch):
    s = FakeBatchServer()
    s.responder = responder
    s.start()
    point_sdks_at(monkeypatch, s)
    yield s
    s.stop()


@pytest.fixture
def db(db_path):
    con = open_db(db_path)
    build_db(con)
    con.close()
    return db_path


def label(db, spec, *extra):
    return main(["label", "--db", db, "--source", SOURCE, "--features", FEATURES,
                 "--explainer", spec, "--simulator", spec, "--batch", "--batch-poll", "0",
                 "--no-progress", *extra])


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-haiku-4-5", "anthropic")])
def test_label_batch_end_to_end(server, db, spec, api, capsys):
    assert label(db, spec) == 0
    out = capsys.readouterr()
    assert "labelled now" in out.out
    # explain, then simulate, then the shuffled-explanation baselines; nothing sent directly
    batches = server.created_batches(api)
    assert len(batches) == 3
    assert server.requests_for(api) == []
    assert server.batch_item_count(api) == sum(len(b.requests) for b in batches)
    con = open_db(db)
    try:
        labels = con.execute("SELECT feature_id, explanation, score FROM labels WHERE source_id = ? "
                             "ORDER BY feature_id", [SOURCE]).fetchall()
        assert [r[0] for r in labels] == [2, 3, 4, 5]
        assert all("def" in r[1] for r in labels)
        rows = con.execute("SELECT purpose, status, cost_usd, input_tokens, output_tokens, batch_id "
                           "FROM llm_calls WHERE batch_id IS NOT NULL").fetchall()
        assert {r[0] for r in rows} == {"explain", "simulate"} and all(r[1] == "ok" for r in rows)
        assert len(rows) == sum(len(b.requests) for b in batches)
        backend, model = spec.split(":")
        price = PriceTable.load().lookup(backend, model)
        assert all(r[2] == pytest.approx(0.5 * price.cost(r[3], r[4])) for r in rows)
        assert sum(r[2] for r in rows) > 0
        # the final run paid nothing: every answer came from the cache
        final = con.execute("SELECT run_id FROM runs WHERE flow = 'label'").fetchone()[0]
        paid = con.execute("SELECT count(*), coalesce(sum(cost_usd), 0) FROM llm_calls "
                           "WHERE run_id = ? AND status <> 'cached'", [final]).fetchone()
        assert paid == (0, 0)
        # the summary's spend is the run's total from the ledger, batch answers included (it
        # said $0.0000, the final run's share)
        total = con.execute("SELECT sum(cost_usd) FROM llm_calls").fetchone()[0]
        assert _summary_spend(out.out) == f"${total:.4f}" != "$0.0000"
        assert [b["status"] for b in bsql.list_batches(con)] == ["collected"] * 3
        assert con.execute("SELECT status FROM runs WHERE flow = 'label-batch'").fetchone()[0] == "completed"
    finally:
        con.close()


def _summary_spend(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("spend ")]
    return line.split()[-1]


def test_label_batch_no_wait_submits_one_phase_per_run(server, db, capsys):
    spec = "openai:gpt-4o-mini"
    server.hold = True
    assert label(db, spec, "--no-wait") == 0
    assert len(server.created_batches()) == 1
    assert "run the same command again" in capsys.readouterr().err
    # the next night, the batch still runs: nothing new is submitted, nothing is labelled
    assert label(db, spec, "--no-wait") == 0
    assert len(server.created_batches()) == 1
    con = open_db(db)
    assert con.execute("SELECT count(*) FROM explanations").fetchone()[0] == 0
    con.close()
    server.hold = False
    server.batch_polls = 0  # from now on a batch has ended by the time it is first polled
    runs = 0
    while True:
        assert label(db, spec, "--no-wait") == 0
        runs += 1
        if "labelled now" in capsys.readouterr().out:
            break
        assert runs < 5
    assert runs == 3  # collect explain + submit simulate; ... baselines; collect + label
    assert len(server.created_batches()) == 3
    assert server.requests_for("openai") == []
    con = open_db(db)
    try:
        assert con.execute("SELECT count(*) FROM labels WHERE source_id = ?", [SOURCE]).fetchone()[0] == 4
        statuses = [r[0] for r in con.execute(
            "SELECT status FROM runs WHERE flow = 'label-batch' ORDER BY started_at").fetchall()]
        assert statuses == ["waiting"] * 4 + ["completed"]
        # every --no-wait run keeps its attempts by outcome: the batch answers as used
        outcomes = [json.loads(r[0]) for r in con.execute(
            "SELECT call_outcomes FROM runs WHERE flow = 'label-batch' ORDER BY started_at").fetchall()]
        assert all(o is not None for o in outcomes)
        used = [sum(o["used"].values()) for o in outcomes]
        assert sum(used) == sum(len(b.requests) for b in server.created_batches()) and used[0] == 0
    finally:
        con.close()


def test_label_batch_expired_explain_batch_with_direct_retry(server, db, capsys):
    spec = "anthropic:claude-haiku-4-5"
    server.plan(expire_after=1)  # one explanation comes back, three expire
    assert label(db, spec, "--batch-retry", "direct") == 0
    assert "labelled now" in capsys.readouterr().out
    direct = server.requests_for("anthropic")
    assert len(direct) == 3 and all("explain" not in r.user_text[:0] for r in direct)
    con = open_db(db)
    try:
        assert con.execute("SELECT count(*) FROM labels WHERE source_id = ?", [SOURCE]).fetchone()[0] == 4
        expired = con.execute("SELECT count(*) FROM llm_calls WHERE status = 'error' AND "
                              "error LIKE 'expired in batch%'").fetchone()[0]
        assert expired == 3
        full_price = con.execute("SELECT count(*) FROM llm_calls WHERE batch_id IS NULL AND "
                                 "status = 'ok'").fetchone()[0]
        assert full_price == 3
    finally:
        con.close()


def test_label_batch_refuses_without_a_batch_backend(server, db, capsys):
    code = main(["label", "--db", db, "--source", SOURCE, "--features", FEATURES, "--batch"])
    assert code != 0
    assert "--batch needs an openai:MODEL or anthropic:MODEL" in capsys.readouterr().err
    code = main(["label", "--db", db, "--source", SOURCE, "--no-wait"])
    assert code != 0 and "--no-wait goes with --batch" in capsys.readouterr().err


def test_label_flow_on_a_schedule_submits_one_night_and_collects_the_next(server, db, prefect_server):
    """What `serve --batch --no-wait` runs each night: the label flow with batch=True, no_wait=True."""
    from featurescribe.flows.label_flow import label_flow

    server.batch_polls = 0  # every batch has ended by the next night
    opts = dict(db=db, source=SOURCE, features=FEATURES, explainer="openai:gpt-4o-mini",
                simulator="openai:gpt-4o-mini", batch=True, no_wait=True, no_progress=True)
    nights = []
    for _ in range(6):
        summary = label_flow(**opts)
        nights.append(len(server.created_batches()))
        if summary is not None:
            break
    assert nights == [1, 2, 3, 3]  # explain; simulate; baselines; collected and labelled
    con = open_db(db)
    try:  # the last night's spend: the baselines' batch it collected; the final run's calls were cached
        (last_batch_run,) = con.execute("SELECT run_id FROM runs WHERE flow = 'label-batch' "
                                        "ORDER BY started_at DESC LIMIT 1").fetchone()
        night = con.execute("SELECT sum(cost_usd) FROM llm_calls WHERE run_id IN (?, ?)",
                            [last_batch_run, summary.run_id]).fetchone()[0]
        direct = con.execute("SELECT count(*) FROM llm_calls WHERE run_id = ? AND status <> 'cached'",
                             [summary.run_id]).fetchone()[0]
    finally:
        con.close()
    assert summary.labelled == [2, 3, 4, 5] and direct == 0
    assert summary.spent_usd == pytest.approx(night) and night > 0
    assert server.requests_for("openai") == []


def _one_bad_explanation_prompt():
    """The responder, except that the first explanation prompt it sees (always the same prompt,
    asked again) gets an answer that is not JSON: that feature cannot be labelled."""
    bad: set[str] = set()

    def answer(req):
        if "explanation" in json.dumps((req.json_schema or {}).get("properties", {})):
            if not bad:
                bad.add(req.user_text)
            if req.user_text in bad:
                return "no JSON here"
        return responder(req)

    return answer


@pytest.mark.parametrize("all_bad", [False, True])
def test_label_batch_with_failed_features_ends_partial_or_failed(server, db, capsys, all_bad):
    """A batch run whose features partly failed ends `partial` with exit status 3 (the batch
    phases' run too, with the counts); one in which nothing could be labelled ends `failed`, 1."""
    from featurescribe.statuses import ExitStatus

    server.responder = (lambda req: "no JSON here") if all_bad else _one_bad_explanation_prompt()
    code = label(db, "openai:gpt-4o-mini")
    out = capsys.readouterr().out
    con = open_db(db)
    try:
        runs = dict(con.execute("SELECT flow, status FROM runs").fetchall())
        notes = dict(con.execute("SELECT flow, error FROM runs").fetchall())
        n_labels = con.execute("SELECT count(*) FROM labels").fetchone()[0]
    finally:
        con.close()
    want = ("failed", ExitStatus.ERROR, 0) if all_bad else ("partial", ExitStatus.PARTIAL, 3)
    assert (runs["label"], code, n_labels) == want, out
    assert runs["label-batch"] == want[0]
    assert f"{4 - want[2]} failed" in notes["label-batch"] and f"{want[2]} labelled" in notes["label-batch"]
    assert "failed feature" in out


BUDGET = "2"  # an explain answer costs about $0.9 at these prices, the 4 together $3.65


def test_label_batch_budget_caps_the_batches_and_pays_no_list_price(server, db, tmp_path, monkeypatch, capsys):
    """`label --batch --budget-usd X`: what the batches may cost is capped by their worst case
    (the explain batch went out whole while anything was left, at several times the budget), and
    what they left unasked is not asked directly at the list price by the final run."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"openai:gpt-4o-mini": {"input": 1000, "output": 1000}}}))
    monkeypatch.setenv("FEATURESCRIBE_PRICES", str(prices))
    assert label(db, "openai:gpt-4o-mini", "--budget-usd", BUDGET) == 0
    out = capsys.readouterr()
    assert "stopped at budget" in out.out or "stopped at the budget" in out.out
    assert server.requests_for("openai") == []  # nothing at the list price
    assert 0 < server.batch_item_count("openai"), out.err
    con = open_db(db)
    try:
        spent = con.execute("SELECT sum(cost_usd) FROM llm_calls").fetchone()[0]
    finally:
        con.close()
    assert spent <= float(BUDGET), spent
