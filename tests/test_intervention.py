"""The intervention scorer: judges (lexical, OpenAI and Anthropic through the real SDKs, local),
the planted bed of output directions, and `label --scorers ...,intervention` / `--output-effects`
on a real harvest of SmolLM2-135M."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from featurescribe.cli import main
from featurescribe.records import Explanation
from featurescribe.scorers.intervention import LexicalPairJudge, lexical_hits, make_pair_judge
from tests.dbq import q
from tests.test_steer import _digest, harvested, hdb, local  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- the lexical judge
def test_lexical_hits_reads_quotes_classes_and_content_words():
    assert lexical_hits('the word "water"', "water, water and more Water") == 3
    assert lexical_hits("numbers written with digits", "in 2024 there were 12") == 6
    assert lexical_hits("talk about bicycles and wheels", "wheels of bicycles turn") == 2
    assert lexical_hits('the word "water"', "nothing here") == 0


def test_lexical_judge_picks_the_continuation_with_more_hits_and_ties_when_equal():
    picks = asyncio.run(LexicalPairJudge().pick('the word "money"', [
        ("p", "money money", "no"), ("p", "none", "the money"), ("p", "a", "b")]))
    assert picks == ["A", "B", "tie"]


# ----------------------------------------------------------------------------- the planted bed
@pytest.fixture(scope="module")
def bed(local):
    from featurescribe.scorers.intervention import InterventionConfig
    from featurescribe.steer.planted import build_output_bed

    return build_output_bed(local, config=InterventionConfig(n_prompts=6, max_new_tokens=10))


def _score_all(bed, judge):
    from featurescribe.scorers.intervention import score_intervention

    async def run():
        return [await score_intervention(e, bed.steering, judge) for e in bed.explanations()]

    return asyncio.run(run())


def test_planted_output_bed_lexical_judge_tells_true_descriptions(bed):
    from featurescribe.testbed.planted import ranking_auc

    exps = bed.explanations()
    res = _score_all(bed, LexicalPairJudge())
    assert ranking_auc(exps, res, "intervention").auc >= 0.9
    true = [r for e, r in zip(exps, res) if e.method == "true"]
    assert min(r.value for r in true) >= 0.75
    for r in res:  # the score is the accuracy of its audit rows, and KL is near the target
        assert r.value == pytest.approx(sum(x.correct for x in r.interventions) / len(r.interventions))
        assert r.details["calibration"]["kl"] == pytest.approx(2.0, rel=0.3)
        assert len(r.interventions) == 6 and {x.role for x in r.interventions} == {"explanation"}


def _answer_by_digits(req):
    """A judge that picks, in each pair, the continuation with more digits."""
    pairs = re.findall(r"  A: (.*)\n  B: (.*)", req.user_text)
    answers = ["A" if sum(c.isdigit() for c in a) >= sum(c.isdigit() for c in b) else "B" for a, b in pairs]
    return json.dumps({"answers": answers})


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
def test_llm_judges_through_the_real_sdks(bed, fake_llm, spec):
    from featurescribe.llm import make_client
    from featurescribe.scorers.intervention import score_intervention

    fake_llm.responder = _answer_by_digits
    exp = next(e for e in bed.explanations() if e.method == "true" and e.feature_id == 0)

    async def run():
        client = make_client(spec)
        try:
            return await score_intervention(exp, bed.steering, make_pair_judge(spec, client),
                                            other="the word \"money\"", other_id="x")
        finally:
            await client.aclose()

    res = asyncio.run(run())
    assert res.simulator == spec and res.scorer == "intervention"
    assert res.value >= 5 / 6  # the steered continuation has the digits
    assert res.baseline_shuffled is not None and len(res.interventions) == 12
    assert {r.role for r in res.interventions} == {"explanation", "shuffled"}
    sent = fake_llm.requests[-1]
    assert "Explanation of the feature:" in sent.user_text and sent.json_schema is not None


def test_llm_judge_answers_of_the_wrong_length_fail_cleanly(bed, fake_llm):
    from featurescribe.llm import make_client
    from featurescribe.scorers.intervention import InterventionFailed, score_intervention

    fake_llm.responder = lambda req: json.dumps({"answers": ["A"]})
    exp = bed.explanations()[0]

    async def run():
        client = make_client("openai:gpt-4o-mini")
        try:
            return await score_intervention(exp, bed.steering, make_pair_judge("openai:gpt-4o-mini", client))
        finally:
            await client.aclose()

    with pytest.raises(InterventionFailed, match="expected 6 answers"):
        asyncio.run(run())


def test_local_judge_answers_every_pair_in_one_pass(bed):
    from featurescribe.llm import make_client
    from featurescribe.scorers.intervention import LocalPairJudge, score_intervention

    client = make_client("local:smollm2-135m", use_cache=False)
    judge = make_pair_judge("local:smollm2-135m", client)
    assert isinstance(judge, LocalPairJudge)
    exp = bed.explanations()[0]
    res = asyncio.run(score_intervention(exp, bed.steering, judge))
    assert 0.0 <= res.value <= 1.0 and len(res.interventions) == 6
    assert {r.picked for r in res.interventions} <= {"A", "B"}
    assert [r.purpose for r in client.ledger] == ["intervention"]


# ----------------------------------------------------------------------------- in the label run
_q = q


def test_label_with_the_intervention_scorer_stores_scores_audit_rows_and_passes(hdb, capsys):
    assert main(["label", "--db", hdb, "--source", "3-mlp", "--features", "20:23", "--no-progress",
                 "--scorers", "simulation,intervention", "--intervention-prompts", "4",
                 "--windows", "test.top=4,test.random=4", "--baseline", "every"]) == 0
    out = capsys.readouterr().out
    rows = _q(hdb, """SELECT s.explanation_id, s.value, s.baseline_shuffled, s.simulator, s.n_examples,
                             s.details FROM scores s WHERE s.scorer = 'intervention'""")
    labelled = _q(hdb, "SELECT count(*) FROM labels")[0][0]
    assert "labelled now" in out and len(rows) == labelled >= 2
    for eid, value, base, judge, n, details in rows:
        details = json.loads(details)
        assert judge == "lexical" and n == 4 and base is not None
        audit = _q(hdb, "SELECT role, correct, strength, kl FROM interventions WHERE explanation_id = ?", [eid])
        mine = [c for role, c, _, _ in audit if role == "explanation"]
        shuffled = [c for role, c, _, _ in audit if role == "shuffled"]
        assert len(mine) == len(shuffled) == 4
        assert value == pytest.approx(sum(mine) / 4) and base == pytest.approx(sum(shuffled) / 4)
        assert {a[2] for a in audit} == {details["calibration"]["strength"]}
    # every forward pass is a ledger row (local, cost 0), as many as the scores report
    passes = _q(hdb, "SELECT count(*), sum(cost_usd), min(backend) FROM llm_calls WHERE purpose = 'intervention'")[0]
    reported = sum(json.loads(d)["forward_passes"] for *_, d in rows)
    assert passes == (reported, 0.0, "local")
    # the labels view still prefers the simulation score
    assert {r[0] for r in _q(hdb, "SELECT scorer FROM labels")} == {"simulation"}


def test_label_output_effects_are_stored_and_shown_to_the_explainer(hdb, fake_llm):
    prompts = []

    def responder(req):
        prompts.append(req.user_text)
        return json.dumps({"explanation": 'the tokens " def" and " class"'})

    fake_llm.responder = responder
    assert main(["label", "--db", hdb, "--source", "3-mlp", "--features", "20:22", "--no-progress",
                 "--explainer", "openai:gpt-4o-mini", "--output-effects", "5", "--intervention-prompts", "4"]) == 0
    stored = _q(hdb, """SELECT feature_id, output_rising, output_falling, output_effects->>'kl'
                        FROM features WHERE output_rising IS NOT NULL ORDER BY 1""")
    assert [r[0] for r in stored] == [20, 21]
    assert all(len(r[1]) == 5 and len(r[2]) == 5 and float(r[3]) > 0 for r in stored)
    lines = [x for p in prompts for x in p.splitlines() if x.startswith("Steering test:")]
    assert len(lines) == 2 and json.dumps(stored[0][1][0], ensure_ascii=False) in "\n".join(lines)
    n = _q(hdb, "SELECT count(*) FROM llm_calls WHERE purpose = 'output_effects'")[0][0]
    assert n > 0
    # a second run reads them from the database: no new forward pass
    assert main(["label", "--db", hdb, "--source", "3-mlp", "--features", "20:22", "--no-progress", "--redo",
                 "--explainer", "openai:gpt-4o-mini", "--output-effects", "5", "--intervention-prompts", "4"]) == 0
    assert _q(hdb, "SELECT count(*) FROM llm_calls WHERE purpose = 'output_effects'")[0][0] == n
    # the Neuronpedia export carries them as the feature's positive and negative tokens
    import gzip
    from pathlib import Path

    out = Path(hdb).parent / "np"
    assert main(["export", "--db", hdb, "--format", "neuronpedia", "--out", str(out)]) == 0
    rows = [json.loads(x) for f in out.glob("*/3-mlp/features/batch-*.jsonl.gz")
            for x in gzip.open(f, "rt").read().splitlines()]
    f20 = next(r for r in rows if r["index"] == "20")
    assert f20["pos_str"] == stored[0][1] and f20["neg_str"] == stored[0][2]
    assert len(f20["pos_values"]) == 5 and all(v > 0 for v in f20["pos_values"])
    assert all(v < 0 for v in f20["neg_values"])
    assert next(r for r in rows if r["index"] == "30")["pos_str"] == []


@pytest.mark.parametrize("sql,extra,message", [
    ("UPDATE sources SET model_id = 'no-such-model'", [], "cannot load the model of source '3-mlp'"),
    ("UPDATE sources SET layer = 99", [], "layer 99 is out of range: the model has 30 layers"),
    (None, ["--intervention-prompts", "99"], "the number of neutral prompts must be 1 to 16"),
    (None, ["--target-kl", "0"], "--target-kl must be a positive number"),
    (None, ["--scorers", "intervention,vibes"], "unknown scorer(s) vibes"),
])
def test_label_intervention_bad_input_is_one_line_and_nothing_written(hdb, capsys, sql, extra, message):
    from featurescribe.store import open_db

    if sql:
        con = open_db(hdb)
        con.execute(sql)
        con.close()
    before = _digest(hdb)
    args = ["label", "--db", hdb, "--source", "3-mlp", "--features", "20:22", "--no-progress",
            "--scorers", "simulation,intervention", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert _digest(hdb) == before
