"""The label pipeline and the `label` command: chunks, resume, candidates, failures, budget."""

from __future__ import annotations

import asyncio
import json
import pickle
import re

import numpy as np
import pytest

from featurescribe.cli import build_parser, main
from featurescribe.errors import FeaturescribeError
from featurescribe.flows.label_command import print_summary
from featurescribe.flows.label_core import (
    compute_chunk,
    parse_feature_spec,
    prepare_chunk,
    select_features,
    write_chunk,
)
from featurescribe.flows.label_options import LabelOptions, from_args
from featurescribe.flows.label_run import run_label
from featurescribe.store import open_db
from tests.dbq import q
from tests.test_sampling import SOURCE, build_db
from tests.test_simulators import _shown_tokens, activations_answer, logprob_reply

GOOD = 'the tokens " def", " class" and " return"'


_q = q


def _cli(db, *extra):
    """The `label` command itself (the Prefect label flow)."""
    return main(["label", "--db", db, "--source", SOURCE, "--no-progress", *extra])


def _label(db, *extra):
    """The same options through `label_run.run_label` (the pipeline without Prefect), with the
    command's summary."""
    args = build_parser().parse_args(["label", "--db", db, "--source", SOURCE, "--no-progress", *extra])
    summary = run_label(args.db, from_args(args), progress=False)
    print_summary(summary)
    return 0


def test_label_command_end_to_end(labdb, capsys, prefect_server):
    assert _cli(labdb, "--features", "0:8") == 0
    out = capsys.readouterr().out
    assert "labelled now                  6" in out
    assert "skipped: dead                 1  [0]" in out
    assert "skipped: rare                 1  [1]" in out
    assert "rare: active in 3 sequences" in out
    labels = dict(_q(labdb, "SELECT feature_id, explanation FROM labels"))
    assert sorted(labels) == [2, 3, 4, 5, 6, 7]
    assert labels[2] == GOOD
    assert _q(labdb, "SELECT count(*) FROM examples WHERE feature_id IN (0, 1)") == [(0,)]
    assert _q(labdb, "SELECT count(DISTINCT feature_id) FROM examples") == [(6,)]
    # every chosen explanation has a test simulation score, with baselines beside it: the token
    # baseline always, a shuffled one (default --baseline sample:10: at least the chunk's first
    # feature) or the population baseline, the mean of those shuffled ones
    rows = _q(labdb, """SELECT s.split, s.scorer, s.simulator, s.baseline_tokens IS NOT NULL, e.chosen,
                               e.status, e.method, s.baseline_shuffled, s.baseline_population
                        FROM scores s JOIN explanations e USING (explanation_id)""")
    assert len(rows) == 6
    assert {r[:7] for r in rows} == {("test", "simulation", "lexical", True, True, "ok", "tokens")}
    own = [r[7] for r in rows if r[7] is not None]
    assert own and all(r[8] == pytest.approx(sum(own) / len(own)) for r in rows if r[7] is None)
    assert _q(labdb, "SELECT flow, status, params->>'explainer' FROM runs") == \
        [("label", "completed", "baseline:tokens")]
    # the simulations table recomputes each score
    n = _q(labdb, "SELECT count(*) FROM simulations")[0][0]
    assert n == 6 * 20  # 10 top + 10 random test windows per feature


def test_window_counts_per_split_and_kind(labdb):
    assert _label(labdb, "--features", "2:4", "--windows", "test.top=3, test.random=2,valid.random=0") == 0
    counts = _q(labdb, "SELECT split, kind, count(*) FROM examples WHERE feature_id = 2 GROUP BY ALL ORDER BY ALL")
    assert counts == [("explain", "quantile", 4), ("explain", "top", 20), ("test", "random", 2),
                      ("test", "top", 3), ("valid", "top", 5)]
    assert _q(labdb, "SELECT count(*) FROM simulations WHERE split = 'test'") == [(2 * 5,)]


def test_resume_skips_done_features(labdb, capsys):
    assert _label(labdb, "--features", "2:5") == 0
    capsys.readouterr()
    assert _label(labdb, "--features", "0:8") == 0
    out = capsys.readouterr().out
    assert "already labelled (skipped)    3" in out
    assert "labelled now                  3" in out
    assert _q(labdb, "SELECT count(*), count(DISTINCT feature_id) FROM explanations") == [(6, 6)]
    assert _q(labdb, "SELECT count(*) FROM runs WHERE status = 'completed'") == [(2,)]


def _explain_responder(texts_by_seed=None, default=GOOD):
    def responder(req):
        if req.json_schema and "explanation" in json.dumps(req.json_schema):
            seed = req.body.get("seed")
            text = (texts_by_seed or {}).get(seed, default)
            return json.dumps({"explanation": text})
        return "ok"
    return responder


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-haiku-4-5", "anthropic")])
def test_label_llm_explainer_and_rerun_makes_no_new_calls(labdb, fake_llm, capsys, spec, api):
    fake_llm.responder = _explain_responder()
    assert _label(labdb, "--features", "0:8", "--explainer", spec) == 0
    n_requests = len(fake_llm.requests_for(api))
    assert n_requests == 6  # one explanation per alive feature
    assert "explain_pairs" not in capsys.readouterr().err
    rows = _q(labdb, "SELECT explainer, method, text, chosen FROM explanations")
    assert set(rows) == {(spec, "pairs", GOOD, True)}
    ledger = _q(labdb, "SELECT purpose, status, count(*), sum(cost_usd) > 0 FROM llm_calls GROUP BY ALL")
    assert ledger == [("explain", "ok", 6, True)]
    # a re-run of done features does nothing; --redo answers from the cache, no new request
    assert _label(labdb, "--features", "0:8", "--explainer", spec) == 0
    assert _label(labdb, "--features", "0:8", "--explainer", spec, "--redo") == 0
    assert len(fake_llm.requests_for(api)) == n_requests
    assert _q(labdb, "SELECT status, count(*) FROM llm_calls GROUP BY ALL ORDER BY ALL") == \
        [("cached", 6), ("ok", 6)]
    # the newer explanation is the chosen one now, the older kept
    assert _q(labdb, "SELECT chosen, count(*) FROM explanations GROUP BY ALL ORDER BY ALL") == \
        [(False, 6), (True, 6)]


@pytest.mark.slow
def test_label_with_a_local_explainer_writes_explanations(labdb, smollm2):
    """`label --explainer local:MODEL`: a real SmolLM2 writes (weak, but parsed) plain-text
    explanations of the marked windows; they are scored like any other."""
    from featurescribe.llm.backends.local import register_local_model

    name, model, tokenizer = smollm2
    register_local_model(name, model, tokenizer)
    assert _label(labdb, "--features", "2:4", "--explainer", f"local:{name}") == 0
    rows = _q(labdb, "SELECT feature_id, explainer, method, status, text, error FROM explanations ORDER BY 1")
    assert [r[0] for r in rows] == [2, 3]
    assert {(r[1], r[2]) for r in rows} == {(f"local:{name}", "marked")}
    ok = [r for r in rows if r[3] == "ok"]
    assert ok, rows  # greedy first, then seeded samples: the same answers on every run
    assert all(r[4] and 2 <= len(r[4].split()) <= 25 and r[5] is None for r in ok)
    assert _q(labdb, "SELECT count(*) FROM labels") == [(len(ok),)]
    assert _q(labdb, "SELECT DISTINCT backend, purpose FROM llm_calls") == [("local", "explain")]


def test_candidates_best_on_valid_is_chosen_and_scored_on_test(labdb, fake_llm):
    texts = {1: 'the token " cat"', 2: GOOD, 3: 'the token " def"'}
    fake_llm.responder = _explain_responder(texts)
    assert _label(labdb, "--features", "2:4", "--explainer", "openai:gpt-4o-mini",
                  "--candidates", "3") == 0
    assert len(fake_llm.requests_for("openai")) == 6
    rows = _q(labdb, """SELECT e.feature_id, e.candidate, e.text, e.chosen, s.split, s.value
                        FROM explanations e JOIN scores s USING (explanation_id)
                        ORDER BY e.feature_id, e.candidate, s.split""")
    for f in (2, 3):
        mine = [r for r in rows if r[0] == f]
        valid = {r[1]: r[5] for r in mine if r[4] == "valid"}
        assert sorted(valid) == [0, 1, 2]  # every candidate scored on valid
        chosen = {r[1] for r in mine if r[3]}
        assert len(chosen) == 1
        (c,) = chosen
        assert valid[c] == max(valid.values())
        assert [r[1] for r in mine if r[4] == "test"] == [c]  # only the chosen one on test
    feature2 = {r[2] for r in rows if r[0] == 2 and r[3]}
    assert feature2 == {GOOD}
    label = _q(labdb, "SELECT explanation, split FROM labels WHERE feature_id = 2")
    assert label == [(GOOD, "test")]


def test_candidates_with_the_same_text_are_stored_once(labdb, fake_llm):
    """--candidates 3 whose answers agree: one explanation row per distinct text per feature and
    run (it stored 3 identical rows, each scored on valid), the first candidate that wrote it."""
    fake_llm.responder = _explain_responder({1: GOOD, 2: GOOD, 3: 'the token " def"'})
    assert _label(labdb, "--features", "2:4", "--explainer", "openai:gpt-4o-mini", "--candidates", "3") == 0
    rows = _q(labdb, "SELECT feature_id, candidate, text FROM explanations ORDER BY 1, 2")
    assert rows == [(f, c, t) for f in (2, 3) for c, t in ((0, GOOD), (2, 'the token " def"'))]
    valid = _q(labdb, "SELECT count(*) FROM scores WHERE split = 'valid' AND scorer = 'simulation'")
    assert valid == [(4,)]  # the two distinct texts of each feature
    assert _q(labdb, "SELECT count(DISTINCT feature_id) FROM labels") == [(2,)]

    fake_llm.responder = _explain_responder()  # all three the same: one row, nothing to choose between
    assert _label(labdb, "--features", "4:6", "--explainer", "openai:gpt-4o-mini", "--candidates", "3") == 0
    assert _q(labdb, "SELECT feature_id, text, chosen FROM explanations WHERE feature_id >= 4 ORDER BY 1") == \
        [(4, GOOD, True), (5, GOOD, True)]


def test_candidates_honour_the_baseline_option(labdb, fake_llm):
    """--candidates N with --baseline sample:N: only the sampled features' candidates are scored
    on `valid` against a shuffled explanation, the others carry the population baseline; with
    --baseline every every candidate has its own, with none no candidate has one."""
    fake_llm.responder = _explain_responder({1: 'the token " cat"', 2: GOOD, 3: 'the token " def"'})

    def valid_baselines(*option):
        assert _label(labdb, "--features", "2:6", "--explainer", "openai:gpt-4o-mini", "--candidates", "3",
                      "--redo", *option) == 0
        return _q(labdb, """SELECT e.feature_id, s.baseline_shuffled IS NOT NULL, s.baseline_population
                            FROM explanations e JOIN scores s USING (explanation_id)
                            WHERE s.split = 'valid' AND e.run_id = (SELECT run_id FROM runs
                                                                    ORDER BY started_at DESC LIMIT 1)
                            ORDER BY 1, e.candidate""")

    sampled = valid_baselines("--baseline", "sample:1000")
    assert len(sampled) == 4 * 3
    assert [(f, own) for f, own, _ in sampled if own] == [(2, True)] * 3  # the chunk's first feature
    assert all(pop is not None for f, own, pop in sampled if not own)
    assert all(own for _, own, _ in valid_baselines("--baseline", "every"))
    assert not any(own or pop is not None for _, own, pop in valid_baselines("--baseline", "none"))


def test_unparseable_explanations_are_recorded_failed_never_scored(labdb, fake_llm, capsys):
    fake_llm.responder = lambda req: "not json at all"
    assert _label(labdb, "--features", "2:4", "--explainer", "openai:gpt-4o-mini") == 0
    out = capsys.readouterr().out
    assert "failed                        2  [2, 3]" in out
    assert _q(labdb, "SELECT status, text, chosen, count(*) FROM explanations GROUP BY ALL") == \
        [("failed", "", False, 2)]
    errors = [r[0] for r in _q(labdb, "SELECT error FROM explanations")]
    assert len(errors) == 2 and all(e and "parse failure" in e and "not valid JSON" in e for e in errors), errors
    assert _q(labdb, "SELECT count(*) FROM scores") == [(0,)]
    assert _q(labdb, "SELECT count(*) FROM labels") == [(0,)]
    assert _q(labdb, "SELECT DISTINCT status FROM llm_calls") == [("parse_error",)]
    # a later run tries them again
    fake_llm.responder = _explain_responder()
    assert _label(labdb, "--features", "2:4", "--explainer", "openai:gpt-4o-mini") == 0
    assert _q(labdb, "SELECT count(*) FROM labels") == [(2,)]


def test_shuffled_baseline_is_the_next_features_explanation(labdb):
    assert _label(labdb, "--features", "2:6", "--baseline", "every") == 0
    rows = _q(labdb, """SELECT e.feature_id, e.text, s.details->'baseline_shuffled'->>'text'
                        FROM explanations e JOIN scores s USING (explanation_id) ORDER BY 1""")
    texts = [r[1] for r in rows]
    assert [r[2] for r in rows] == texts[1:] + texts[:1]


def test_budget_stops_new_calls_and_a_later_run_finishes(labdb, fake_llm, capsys):
    fake_llm.responder = _explain_responder()
    rc = _label(labdb, "--features", "2:8", "--explainer", "openai:gpt-4o-mini",
                "--budget-usd", "0.0000001", "--concurrency", "1", "--chunk-size", "2")
    assert rc == 0
    out = capsys.readouterr().out
    assert "stopped at budget             yes" in out
    assert "stopped at the budget" in out
    assert _q(labdb, "SELECT status FROM runs") == [("stopped",)]
    n_done = _q(labdb, "SELECT count(*) FROM labels")[0][0]
    assert 1 <= n_done < 6
    assert _label(labdb, "--features", "2:8", "--explainer", "openai:gpt-4o-mini") == 0
    assert _q(labdb, "SELECT count(*) FROM labels") == [(6,)]
    assert _q(labdb, "SELECT count(*) FROM explanations WHERE chosen") == [(6,)]


def test_missing_api_key_fails_before_any_work(labdb, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rc = _cli(labdb, "--explainer", "openai:gpt-4o-mini")
    assert rc != 0
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    assert _q(labdb, "SELECT count(*) FROM runs") == [(0,)]
    assert _q(labdb, "SELECT count(*) FROM examples") == [(0,)]


@pytest.mark.parametrize("args,msg", [
    (["--features", "0:99"], "outside the source's 8 features"),
    (["--features", "x"], "bad feature spec"),
    (["--explainer", "lexical"], "simulator, not an explainer"),
    (["--scorers", "simulation,vibes"], "unknown scorer"),
    (["--candidates", "0"], "at least 1"),
    (["--windows", "test.middle=3"], "bad --windows item 'test.middle=3'"),
    (["--windows", "test.top=-1"], "N must be a whole number"),
    (["--windows", "test.top=0,test.random=0"], "leaves the test split empty"),
    (["--sim-windows-per-call", "0"], "--sim-windows-per-call must be at least 1"),
    (["--baseline", "sample:0"], "bad --baseline 'sample:0'"),
    (["--gate", "vibes:0.5"], "bad --gate 'vibes:0.5'"),
    (["--budget-usd", "nan"], "--budget-usd must be a number of dollars, 0 or more"),
    (["--budget-usd", "-1"], "--budget-usd must be a number of dollars, 0 or more"),
    (["--timeout", "nan"], "--timeout must be a number of seconds above 0"),
    (["--features", "5:5"], "bad feature spec '5:5'"),
    (["--window", "0"], "--window must be at least 1 token"),
    (["--explain-windows", "0"], "--explain-windows must be at least 1"),
    (["--explain-windows", "-1"], "--explain-windows must be at least 1"),
    (["--batch-poll", "-1"], "--batch-poll must be a number of seconds, 0 or more"),
])
def test_user_errors_are_one_line(labdb, capsys, args, msg):
    assert _cli(labdb, *args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_unknown_source(labdb, capsys):
    assert main(["label", "--db", labdb, "--source", "9-nope", "--no-progress"]) != 0
    assert "no source '9-nope' (sources in this database: 3-test)" in capsys.readouterr().err


def test_feature_specs():
    assert parse_feature_spec("0:4", 10) == [0, 1, 2, 3]
    assert parse_feature_spec("7,3,3", 10) == [3, 7]
    assert parse_feature_spec("8:", 10) == [8, 9]
    assert parse_feature_spec("ALL", 10) == "all"
    assert parse_feature_spec("alive", 10) == "alive"
    with pytest.raises(FeaturescribeError):
        parse_feature_spec("3:1", 10)


def test_select_alive_and_all(labdb):
    con = open_db(labdb)
    try:
        assert select_features(con, SOURCE, "all") == list(range(8))
        assert select_features(con, SOURCE, "alive") == list(range(1, 8))
    finally:
        con.close()


def test_alive_on_a_source_without_alive_features_is_refused_saying_why(smollm2, db_path, tmp_path, capsys):
    """It exited 0 printing 'features selected 0' and nothing else, where a range that selects
    nothing (5:5) is refused."""
    from featurescribe.harvest.harvester import HarvestConfig, harvest

    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    harvest(HarvestConfig(db=db_path, model="smollm2-135m", layer="1", site="mlp", corpus=str(corpus), ctx=16,
                          max_tokens=32, threshold="1000000", progress=False), loaded=smollm2)
    rc = main(["label", "--db", db_path, "--source", "1-mlp", "--features", "alive", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("featurescribe: error: --features alive selects no feature of source 1-mlp: 1,536 are "
                          "dead (never above its harvest threshold 1e+06) and 0 rare")
    assert _q(db_path, "SELECT count(*) FROM runs") == [(0,)]
    assert _q(db_path, "SELECT count(*) FROM examples") == [(0,)]
    assert main(["label", "--db", db_path, "--source", "1-mlp", "--features", "0:2", "--no-progress"]) == 0


def test_steps_are_plain_picklable_and_compute_needs_no_database(labdb):
    """prepare (writer) -> compute (no DuckDB: the connection is closed) -> write (writer)."""
    params = LabelOptions(source=SOURCE, features="0:8")
    con = open_db(labdb)
    prepared = prepare_chunk(con, params, select_features(con, SOURCE, "0:8"))
    con.close()
    prepared = pickle.loads(pickle.dumps(prepared))
    assert [s.feature_id for s in prepared.skipped] == [0, 1]
    result = asyncio.run(compute_chunk(prepared, pickle.loads(pickle.dumps(params)), run_id="r1"))
    result = pickle.loads(pickle.dumps(result))
    assert result.labelled == [2, 3, 4, 5, 6, 7]
    con = open_db(labdb)
    try:
        counts = write_chunk(con, result, run_id="r1")
    finally:
        con.close()
    assert counts.explanations == 6 and counts.scores == 6
    assert _q(labdb, "SELECT DISTINCT run_id FROM explanations") == [("r1",)]


def test_compute_with_a_memory_store_and_write_flushes_its_ledger(labdb, fake_llm):
    """The Dask path: compute records to an in-memory CallStore; write_chunk writes its rows and
    answers in the chunk's transaction, and a second compute is answered from that cache."""
    from featurescribe.store.memory_calls import MemoryCallStore

    fake_llm.responder = _explain_responder()
    params = LabelOptions(source=SOURCE, features="2:5", explainer="openai:gpt-4o-mini")
    con = open_db(labdb)
    prepared = prepare_chunk(con, params, [2, 3, 4])
    con.close()
    memory = MemoryCallStore()
    result = asyncio.run(compute_chunk(prepared, params, store=memory, run_id="r2"))
    assert result.labelled == [2, 3, 4] and result.spent_usd > 0
    con = open_db(labdb)
    try:
        counts = write_chunk(con, result, run_id="r2", calls=memory)
        cached = {k: v for k, v in con.execute(
            "SELECT cache_key, response::VARCHAR FROM llm_cache").fetchall()}
    finally:
        con.close()
    assert counts.ledger_rows == 3
    assert _q(labdb, "SELECT run_id, purpose, status, count(*) FROM llm_calls GROUP BY ALL") == \
        [("r2", "explain", "ok", 3)]
    assert len(fake_llm.requests_for("openai")) == 3
    again = MemoryCallStore({k: json.loads(v) for k, v in cached.items()})
    result = asyncio.run(compute_chunk(prepared, params, store=again, run_id="r3"))
    assert result.labelled == [2, 3, 4]
    assert len(fake_llm.requests_for("openai")) == 3  # all answered from the cache


def _reader(req):
    """A judge that reads the explanation: the tokens it quotes are the active ones. It answers
    every request the label pipeline makes: explanations, logprob and structured simulations,
    detection and fuzzing."""
    schema = json.dumps(req.json_schema or {})
    if "explanation" in schema and "activations" not in schema:
        return json.dumps({"explanation": GOOD})
    quoted = {q.strip() for q in re.findall(r'"([^"]+)"', req.user_text.split("\n")[0])}
    fits = lambda tok: tok.strip() in quoted  # noqa: E731
    if "activations" in schema:  # structured simulation: numbered token lines (per text)
        return activations_answer(req.user_text, lambda t: 10 if fits(t) else 0)
    if req.top_logprobs > 0:  # logprob simulation: copy the token lines, a number after each
        lines = _shown_tokens(req.user_text)
        return logprob_reply(lines, [{"10": 0.9, "0": 0.1} if fits(t) else {"0": 1.0} for t in lines])
    texts = re.findall(r"^Text \d+: (.*)$", req.user_text, flags=re.M)
    if "marked" in req.messages[0]["content"]:  # fuzzing: do the marks sit on quoted tokens?
        spans = [re.findall(r"<<(.*?)>>", t) for t in texts]
        answers = [int(bool(s) and all(fits(t) for x in s for t in x.split())) for s in spans]
    else:  # detection: does the text hold a quoted token?
        answers = [int(any(q in t for q in quoted)) for t in texts]
    return json.dumps({"answers": answers})


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-haiku-4-5", "anthropic")])
def test_label_scores_with_every_scorer_through_an_api_judge(labdb, fake_llm, spec, api, tmp_path):
    """`label --explainer X --simulator X --scorers simulation,detection,fuzzing` fills `scores` and
    `simulations` through the real SDK (logprobs for OpenAI, structured output for Anthropic)."""
    fake_llm.responder = _reader
    assert _label(labdb, "--features", "2:4", "--explainer", spec, "--simulator", spec,
                  "--scorers", "simulation,detection,fuzzing", "--baseline", "every") == 0
    rows = _q(labdb, """SELECT e.feature_id, s.scorer, s.simulator, s.split, s.value,
                               s.baseline_shuffled IS NOT NULL, s.baseline_tokens IS NOT NULL
                        FROM scores s JOIN explanations e USING (explanation_id) ORDER BY 1, 2""")
    assert [(r[0], r[1]) for r in rows] == [(f, s) for f in (2, 3) for s in ("detection", "fuzzing", "simulation")]
    assert {(r[2], r[3], r[5]) for r in rows} == {(spec, "test", True)}
    assert all(r[6] for r in rows if r[1] == "simulation")
    value = {(r[0], r[1]): r[4] for r in rows}
    # feature 2 fires on exactly the quoted tokens: the reader's predictions match it
    assert value[(2, "simulation")] > 0.8
    # every window of feature 2 holds a planted token, so all are active: detection has one class
    details = json.loads(_q(labdb, """SELECT s.details FROM scores s JOIN explanations e USING (explanation_id)
                                     WHERE e.feature_id = 2 AND s.scorer = 'detection'""")[0][0])
    assert value[(2, "detection")] == 0.5 and details["flag"] == "one_class" and details["fn"] == 0
    assert value[(2, "fuzzing")] > 0.8
    assert value[(3, "simulation")] < 0.5  # feature 3 fires at random
    _judged_windows_give_the_score_and_delphi_files(labdb, value, tmp_path)
    # every test window's predictions are stored and recompute the score
    sims = _q(labdb, """SELECT e.feature_id, list(m.true_acts ORDER BY m.seq_id, m.start_pos),
                               list(m.predicted ORDER BY m.seq_id, m.start_pos)
                        FROM simulations m JOIN explanations e USING (explanation_id)
                        WHERE m.simulator = ? AND m.split = 'test' GROUP BY 1 ORDER BY 1""", [spec])
    assert [s[0] for s in sims] == [2, 3]
    for f, true, pred in sims:
        assert len(true) == 20
        t, p = np.concatenate(true), np.concatenate(pred)
        assert value[(f, "simulation")] == pytest.approx(np.corrcoef(t, p)[0, 1], abs=1e-9)
    purposes = {r[0] for r in _q(labdb, "SELECT DISTINCT purpose FROM llm_calls WHERE status = 'ok'")}
    assert {"explain", "simulate", "detect", "fuzz"} <= purposes
    assert {r.api for r in fake_llm.requests} == {api}


def _judged_windows_give_the_score_and_delphi_files(labdb, value: dict, tmp_path) -> None:
    """Detection and fuzzing keep each judged window's verdict: the records give the score back,
    and the delphi export writes its per-window score files from them (it wrote none)."""
    from featurescribe.scorers.metrics import balanced_accuracy

    rows = _q(labdb, """SELECT e.feature_id, s.scorer, s.details, s.n_examples
                        FROM scores s JOIN explanations e USING (explanation_id)
                        WHERE s.scorer IN ('detection', 'fuzzing')""")
    for f, scorer, details, n in rows:
        recs = json.loads(details)["records"]
        assert len(recs) == n and all(isinstance(r["seq_id"], int) for r in recs)
        got, _ = balanced_accuracy([r["activating"] for r in recs], [r["prediction"] for r in recs])
        assert got == pytest.approx(value[(f, scorer)])
    out = tmp_path / "delphi"
    assert main(["export", "--db", labdb, "--format", "delphi", "--out", str(out)]) == 0
    for folder in ("detection", "fuzz"):
        files = sorted((out / SOURCE / "scores" / folder).glob("*_latent3.txt"))
        assert len(files) == 1
        records = json.loads(files[0].read_text())
        assert records and all(len(r["str_tokens"]) == len(r["activations"]) > 0 for r in records)


def test_baseline_sample_gives_the_others_the_population_baseline(labdb, fake_llm):
    """--baseline sample:N: one feature in N (here at least the chunk's first) is scored against a
    shuffled explanation; the others carry the mean of those as `baseline_population`, and the
    labels view's lift falls back to it. The scores themselves are those of --baseline every."""
    fake_llm.responder = _reader
    spec = "openai:gpt-4o-mini"
    assert _label(labdb, "--features", "2:6", "--simulator", spec, "--baseline", "sample:1000") == 0
    n_sample = len(fake_llm.requests)
    rows = _q(labdb, """SELECT e.feature_id, s.value, s.baseline_shuffled, s.baseline_population,
                               l.lift
                        FROM scores s JOIN explanations e USING (explanation_id)
                        JOIN labels l USING (explanation_id) ORDER BY 1""")
    own = [r for r in rows if r[2] is not None]
    assert len(own) == 1 and own[0][0] == 2 and own[0][3] is None
    for f, value, shuffled, population, lift in rows[1:]:
        assert shuffled is None and population == pytest.approx(own[0][2])
        assert lift == pytest.approx(value - population)
    values = {r[0]: r[1] for r in rows}
    fake_llm.reset()
    fake_llm.responder = _reader
    assert _label(labdb, "--features", "2:6", "--simulator", spec, "--redo", "--no-cache",
                  "--baseline", "every") == 0
    every = _q(labdb, """SELECT e.feature_id, s.value, s.baseline_shuffled FROM scores s
                         JOIN explanations e USING (explanation_id) WHERE e.chosen ORDER BY 1""")
    assert all(r[2] is not None for r in every)
    assert {r[0]: r[1] for r in every} == pytest.approx(values)
    assert len(fake_llm.requests) > 1.5 * n_sample  # the baselines doubled the simulation calls


def test_bad_baseline_option_is_one_line(labdb, capsys):
    assert _cli(labdb, "--baseline", "some") != 0
    err = capsys.readouterr().err.strip()
    assert "bad --baseline 'some'" in err and len(err.splitlines()) == 1
