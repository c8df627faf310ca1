"""The embedding scorer: AUC of retrieving activating windows by the explanation, with its
shuffled baseline, in `score_explanations` and in a label run."""

from __future__ import annotations

import asyncio

import pytest

from featurescribe.cli import build_parser
from featurescribe.flows.label_run import run_label
from featurescribe.flows.label_options import from_args
from featurescribe.records import Explanation, FeatureExamples, Window
from featurescribe.scorers import score_explanations
from featurescribe.scorers.embedding import auc
from featurescribe.store import open_db


def test_auc():
    assert auc([3, 2], [1, 0]) == 1.0
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5
    assert auc([2, 0], [1]) == 0.5


def _w(text: str, act: float, kind: str) -> Window:
    toks = [" " + t for t in text.split()]
    acts = [act if any(c.isdigit() for c in t) else 0.0 for t in toks]
    return Window(seq_id=hash(text) % 1000, start_pos=0, tokens=toks, acts=acts, kind=kind, split="test")


def test_true_explanation_retrieves_its_windows_better_than_a_shuffled_one():
    pos = ["prices rose 7 percent in 2021", "the train leaves at 9 30", "chapter 12 has 340 pages",
           "call 555 0199 before 5", "he scored 87 points in 2019"]
    neg = ["the cat sat on the mat", "she walked to the river slowly", "birds sing in the morning light",
           "a quiet house by the sea", "they talked about old friends"]
    windows = [_w(t, 3.0, "top") for t in pos] + [_w(t, 0.0, "random") for t in neg]
    fe = FeatureExamples("s", 0, 3.0, windows)
    e = Explanation("e0", "s", 0, "numbers, digits and years", "x", "m")
    res = asyncio.run(score_explanations([e], [fe], scorers="embedding",
                                         other_explanations={"e0": "animals and nature"}))
    (r,) = res.results
    assert r.scorer == "embedding" and r.split == "test" and r.simulator == "local:all-minilm-l6-v2"
    assert r.value > 0.8 and r.baseline_shuffled < r.value
    assert r.n_examples == 10 and r.details["n_activating"] == 5 and r.details["n_non_activating"] == 5

    # no silent random window: a failure, not a score
    fe2 = FeatureExamples("s", 0, 3.0, [w for w in windows if w.kind == "top"])
    res = asyncio.run(score_explanations([e], [fe2], scorers="embedding"))
    assert not res.results and "non-activating" in res.failures[0].error


def test_label_run_stores_embedding_scores_with_baselines(db_path):
    from tests.test_sampling import SOURCE, build_db

    con = open_db(db_path)
    build_db(con, n_features=6)
    con.close()
    args = build_parser().parse_args(["label", "--db", db_path, "--source", SOURCE, "--no-progress",
                                      "--scorers", "simulation,embedding", "--baseline", "every"])
    run_label(args.db, from_args(args), progress=False)
    con = open_db(db_path, read_only=True)
    try:
        rows = con.execute("""SELECT s.value, s.baseline_shuffled, s.split, s.simulator
                              FROM scores s JOIN explanations e USING (explanation_id)
                              WHERE s.scorer = 'embedding' AND e.chosen""").fetchall()
        n_chosen = con.execute("SELECT count(*) FROM explanations WHERE chosen").fetchone()[0]
    finally:
        con.close()
    assert rows and len(rows) <= n_chosen
    for value, base, split, judge in rows:
        assert 0.0 <= value <= 1.0 and base is not None and split == "test"
        assert judge == "local:all-minilm-l6-v2"
