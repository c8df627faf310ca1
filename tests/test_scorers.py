"""Scorers: the numbers, the lexical reading of explanations, storing and recomputing scores."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from featurescribe.llm.base import LLMCallFailed
from featurescribe.records import Explanation, FeatureExamples, Window, discretize
from featurescribe.scorers import (
    LexicalSimulator,
    Simulator,
    TokenMeanSimulator,
    make_simulator,
    parse_scorers,
    score_explanations,
    simulation_score,
)
from featurescribe.scorers.lexical import LexicalRule, quoted_strings
from featurescribe.scorers.metrics import auc, balanced_accuracy, correlation
from featurescribe.testbed.planted import build_bed
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.results import save_scores


@pytest.fixture(scope="module")
def bed():
    return build_bed(tokenizer="words", max_tokens=20_000)


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- metrics
def test_correlation_matches_numpy_and_flags_degenerate_cases():
    rng = np.random.default_rng(0)
    t, p = rng.random(50), rng.random(50)
    assert correlation(t, p).value == pytest.approx(np.corrcoef(t, p)[0, 1])
    assert correlation(t, p).flag is None
    c = correlation(np.zeros(10), p[:10])
    assert (c.value, c.flag) == (0.0, "constant_true")
    c = correlation(t[:10], np.full(10, 3.0))
    assert (c.value, c.flag) == (0.0, "constant_predicted")
    assert correlation([1.0], [2.0]).flag == "empty"
    with pytest.raises(ValueError):
        correlation([1, 2], [1, 2, 3])


def test_balanced_accuracy_and_auc():
    v, counts = balanced_accuracy([True, True, False, False, False, False], [True, False, False, False, False, True])
    assert v == pytest.approx((0.5 + 0.75) / 2)
    assert counts == {"tp": 1, "tn": 3, "fp": 1, "fn": 1}
    v, counts = balanced_accuracy([True, True], [True, False])
    assert v == 0.5 and counts["flag"] == "one_class"
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1], [1]) == 0.5
    assert auc([0], [1, 2]) == 0.0


def test_the_0_10_scale_is_floor_of_ten_relu_over_the_max():
    # floor(10 * relu(a) / max_a), at most 10 (a window above the max the scale was set on)
    assert discretize([-1.0, 0.05, 0.1, 0.55, 1.0, 1.2], 1.0) == [0, 0, 1, 5, 10, 10]
    assert discretize([0.3, 2.0], 4.0) == [0, 5]
    # a feature that never fires above 0 shows all zeros
    assert discretize([-0.5, -2.0], -0.5) == [0, 0]
    assert discretize([0.0, 0.0], 0.0) == [0, 0]


# ----------------------------------------------------------------------------- lexical reading
def test_quoted_strings_of_baseline_explanations():
    assert quoted_strings('the tokens " def", " class" and " return"') == ["def", "class", "return"]
    assert quoted_strings("the keyword `lambda` and 'yield', but don't split on it's") == ["lambda", "yield"]
    assert quoted_strings("no quotes here") == []


def test_lexical_rule_masks_tokens_phrases_and_named_classes():
    tokens = ["The", " cat", " sat", " in", " New", " York", " at", " 4", "5", "."]
    rule = LexicalRule.from_explanation('the word "cat" and the city "New York"')
    assert rule.mask(tokens) == [False, True, False, False, True, True, False, False, False, False]
    digits = LexicalRule.from_explanation("numbers written with digits")
    assert digits.classes == ["digits"]
    assert digits.mask(tokens)[7:9] == [True, True]
    caps = LexicalRule.from_explanation("capitalized words")
    assert [i for i, m in enumerate(caps.mask(tokens)) if m] == [0, 4, 5]
    # a class named inside quotes is a word, not a class
    assert LexicalRule.from_explanation('the word "numbers"').classes == []
    assert LexicalRule.from_explanation("text inside brackets").empty


def test_lexical_simulator_predicts_quoted_tokens():
    sim = make_simulator("lexical")
    assert isinstance(sim, LexicalSimulator)
    w = Window(seq_id=1, start_pos=0, tokens=["x", " def", " f", " class"], acts=[0, 1, 0, 1])
    assert run(sim.simulate('the tokens " def" and " class"', [w])) == [[0.0, 1.0, 0.0, 1.0]]


def test_token_baseline_is_the_mean_on_each_token_in_the_explain_split():
    fe = FeatureExamples("s", 0, 4.0, [
        Window(1, 0, ["a", "b", "a"], [1.0, 0.0, 3.0], split="explain"),
        Window(2, 0, ["b", "c"], [2.0, 0.0], split="explain"),
        Window(3, 0, ["a", "b", "z"], [9.0, 9.0, 9.0], split="test"),
    ])
    sim = make_simulator("baseline:tokens")
    assert isinstance(sim, TokenMeanSimulator) and not sim.uses_explanation
    pred = run(sim.simulate("ignored", fe.split("test"), feature=fe))
    assert pred == [[2.0, 1.0, pytest.approx(6.0 / 5)]]  # 'z' unseen: the mean of all explain tokens


def test_parse_scorers():
    assert parse_scorers("simulation, detection,fuzzing") == ["simulation", "detection", "fuzzing"]
    with pytest.raises(ValueError):
        parse_scorers("simulation,vibes")


# ----------------------------------------------------------------------------- the simulation score
def _windows():
    return [
        Window(1, 0, ["a", "b", "c"], [0.0, 2.0, 0.5], kind="top", split="test"),
        Window(2, 4, ["d", "e", "f"], [0.0, 0.0, 0.0], kind="random", split="test"),
    ]


def test_simulation_score_is_pearson_over_all_windows_with_per_kind_breakdowns():
    ws = _windows()
    pred = [[0.1, 0.9, 0.4], [0.2, 0.0, 0.1]]
    s = simulation_score(ws, pred)
    expected = np.corrcoef([0, 2, 0.5, 0, 0, 0], [0.1, 0.9, 0.4, 0.2, 0.0, 0.1])[0, 1]
    assert s.value == pytest.approx(expected, abs=1e-6)
    assert s.details["per_kind"]["top"] == pytest.approx(np.corrcoef([0, 2, 0.5], [0.1, 0.9, 0.4])[0, 1], abs=1e-6)
    assert s.details["per_kind"]["random"] == 0.0
    assert s.details["per_kind_flags"] == {"random": "constant_true"}
    assert [r.kind for r in s.records] == ["top", "random"]
    assert s.records[0].true_acts == [0.0, 2.0, 0.5]


def test_degenerate_simulations_score_zero_with_a_flag_never_nan():
    ws = _windows()
    s = simulation_score(ws, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert s.value == 0.0 and s.details["flag"] == "constant_predicted"
    silent = [Window(1, 0, ["a", "b"], [0.0, 0.0], split="test")]
    s = simulation_score(silent, [[0.0, 1.0]])
    assert s.value == 0.0 and s.details["flag"] == "constant_true"
    # an explanation the lexical simulator cannot read predicts all zeros: 0, flagged
    fe = FeatureExamples("s", 0, 2.0, ws)
    e = Explanation("e0", "s", 0, "something vague", "x", "m")
    res = run(score_explanations([e], [fe], simulator="lexical")).results
    assert res[0].value == 0.0 and res[0].details["flag"] == "constant_predicted"
    assert not math.isnan(res[0].value)


def test_predictions_that_do_not_line_up_with_the_windows_are_refused():
    ws = _windows()
    # a missing window would be scored on fewer records than its baselines
    with pytest.raises(ValueError, match="1 prediction lists for 2 windows"):
        simulation_score(ws, [[0.1, 0.9, 0.4]])
    # 2 + 4 values for 3 + 3 tokens concatenate to the right total but pair the wrong tokens
    with pytest.raises(ValueError, match="2 predictions for 3 tokens"):
        simulation_score(ws, [[0.1, 0.9], [0.4, 0.2, 0.0, 0.1]])


def test_scorers_and_their_baselines_see_only_the_split_they_score():
    """The explain windows (what the explainer saw) and valid ones never reach a test score."""
    windows = [Window(10, 0, ["x", "y"], [3.0, 0.0], split="explain"),
               Window(11, 0, ["x", "y"], [0.0, 3.0], kind="random", split="valid")] + _windows()
    fe = FeatureExamples("s", 0, 3.0, windows)
    es = [Explanation("e0", "s", 0, 'the token "b"', "x", "m"),
          Explanation("e1", "s", 1, 'the token "d"', "x", "m")]
    other = FeatureExamples("s", 1, 3.0, [Window(20, 0, ["d"], [1.0], split="test"),
                                          Window(21, 0, ["a"], [0.0], kind="random", split="test")])
    out = run(score_explanations(es, [fe, other], simulator="lexical", scorers="simulation,detection,fuzzing"))
    scores = {r.scorer: r for r in out.results if r.explanation_id == "e0"}
    assert {(r.seq_id, r.split) for r in scores["simulation"].simulations} == {(1, "test"), (2, "test")}
    assert scores["simulation"].n_examples == 2
    # the shuffled baseline ("d", the other feature's) is read on the same two windows: 0 on
    # token "d" of the silent window against 2.0 on "b" gives a negative correlation
    true, pred = [0, 2, 0.5, 0, 0, 0], [0, 0, 0, 1, 0, 0]
    assert scores["simulation"].baseline_shuffled == pytest.approx(np.corrcoef(true, pred)[0, 1], abs=1e-6)
    for task in ("detection", "fuzzing"):
        assert {r["seq_id"] for r in scores[task].details["records"]} == {1, 2}


class _Failing(Simulator):
    spec = "openai:broken"

    async def simulate_window(self, explanation, window, feature=None):
        raise LLMCallFailed("every attempt was unparseable")


def test_an_explanation_the_simulator_cannot_use_is_a_failure_not_a_score():
    fe = FeatureExamples("s", 0, 2.0, _windows())
    e = Explanation("e0", "s", 0, 'the token "b"', "x", "m")
    res = run(score_explanations([e], [fe], simulator=_Failing()))
    assert res.results == []
    assert len(res.failures) == 1
    f = res.failures[0]
    assert (f.explanation_id, f.scorer, f.judge) == ("e0", "simulation", "openai:broken")
    assert "unparseable" in f.error


# ----------------------------------------------------------------------------- storing
def _insert_explanations(con, exps):
    cols = ("explanation_id", "source_id", "feature_id", "text", "explainer", "method")
    insert_arrow(con, "explanations", {c: [getattr(e, c) for e in exps] for c in cols})


def test_stored_scores_recompute_from_the_simulations_table(con, bed):
    exps = bed.explanations([0, 1, 4])
    res = run(score_explanations(exps, bed.examples, simulator="lexical",
                                 scorers="simulation,detection,fuzzing"))
    assert not res.failures
    con.execute("BEGIN")
    _insert_explanations(con, exps)
    save_scores(con, res.results, run_id="r1")
    con.execute("COMMIT")
    n_windows = {r.explanation_id: len(r.simulations) for r in res.results if r.scorer == "simulation"}
    rows = con.execute("""
        SELECT s.explanation_id, s.value, list(m.true_acts ORDER BY m.seq_id, m.start_pos),
               list(m.predicted ORDER BY m.seq_id, m.start_pos), count(m.seq_id)
        FROM scores s JOIN simulations m
          ON m.explanation_id = s.explanation_id AND m.simulator = s.simulator AND m.split = s.split
        WHERE s.scorer = 'simulation' GROUP BY ALL""").fetchall()
    assert len(rows) == len(exps)
    varied = 0
    for eid, value, true, pred, n in rows:
        assert n == n_windows[eid]
        t = np.concatenate([np.asarray(x, dtype=np.float64) for x in true])
        p = np.concatenate([np.asarray(x, dtype=np.float64) for x in pred])
        recomputed = np.corrcoef(t, p)[0, 1] if np.ptp(p) > 0 else 0.0
        assert value == pytest.approx(recomputed, abs=1e-9)
        varied += np.ptp(p) > 0
    assert varied >= 3  # the check above compared real correlations, not only flagged zeros
    # the score rows: one per explanation and scorer, with baselines, finite JSON details
    counts = dict(con.execute("SELECT scorer, count(*) FROM scores GROUP BY 1").fetchall())
    assert counts == {"simulation": len(exps), "detection": len(exps), "fuzzing": len(exps)}
    for details, in con.execute("SELECT details FROM scores").fetchall():
        json.loads(details)
    assert con.execute("SELECT count(*) FROM scores WHERE baseline_shuffled IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM scores WHERE scorer = 'simulation' AND baseline_tokens IS NULL"
                       ).fetchone()[0] == 0


def test_saving_again_replaces_rows_and_labels_show_lift(con, bed):
    exps = bed.explanations([0, 1])
    res = run(score_explanations(exps, bed.examples, simulator="lexical")).results
    _insert_explanations(con, exps)
    save_scores(con, res)
    n_sim = con.execute("SELECT count(*) FROM simulations").fetchall()[0][0]
    save_scores(con, res)  # a re-run: same rows, no duplicates
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == len(exps)
    assert con.execute("SELECT count(*) FROM simulations").fetchone()[0] == n_sim
    labels = con.execute("SELECT feature_id, explanation, score, baseline_shuffled, lift FROM labels "
                         "ORDER BY feature_id").fetchall()
    assert [r[1] for r in labels] == [bed.plant(0).explanation, bed.plant(1).explanation]
    for _, _, score, base, lift in labels:
        assert lift == pytest.approx(score - base)
        assert lift > 0.5


def test_save_scores_refuses_nan(con):
    from featurescribe.records import ScoreResult

    with pytest.raises(ValueError):
        save_scores(con, [ScoreResult("e", "simulation", float("nan"), "lexical", 1)])
