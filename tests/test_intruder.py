"""The intruder scorer and the --gate intruder:T option: which window does not belong."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from featurescribe.records import Explanation, FeatureExamples, Window
from featurescribe.scorers import score_explanations
from featurescribe.scorers.classify import LexicalJudge
from featurescribe.scorers.intruder import MEMBERS_PER_SET, build_sets, gate_feature, scoring_windows
from tests.dbq import q
from tests.test_label import _label, _reader
from tests.test_sampling import SOURCE

WORDS = [" the", " cat", " sat", " on", " mat", " a", " dog", " ran", " and", " or", " if", " so"]


def _window(i: int, planted: bool, split: str, kind: str) -> Window:
    toks = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(10)]
    acts = [0.0] * 10
    if planted:
        toks[4], acts[4] = " def", 5.0
    return Window(seq_id=i, start_pos=0, tokens=toks, acts=acts, kind=kind, split=split)


def _feature(planted: bool, split: str = "test") -> FeatureExamples:
    """Top windows that share ' def' where the feature fires (or fire on nothing in common),
    and silent random windows."""
    top = [_window(i, True, split, "top") for i in range(8)]
    if not planted:  # activating, but on different tokens each time
        for i, w in enumerate(top):
            w.tokens[4], w.acts[4] = WORDS[i % len(WORDS)], 0.0
            w.acts[i % 10] = 5.0
    rnd = [_window(100 + i, False, split, "random") for i in range(6)]
    return FeatureExamples("s", 1 if planted else 2, 5.0, top + rnd)


def test_sets_put_one_silent_window_among_activating_ones_at_seeded_places():
    fe = _feature(True)
    members, intruders = scoring_windows(fe, "test")
    sets = build_sets(members, intruders, ("s", 1, "test"))
    assert len(sets) == 5 and all(len(s.windows) == MEMBERS_PER_SET + 1 for s in sets)
    for s in sets:
        assert s.windows[s.intruder].kind == "random"
        assert sum(w.kind == "random" for w in s.windows) == 1
    assert [s.intruder for s in sets] == [s.intruder for s in build_sets(members, intruders, ("s", 1, "test"))]
    assert len({s.intruder for s in sets}) > 1
    assert build_sets(members[:3], intruders, ("s", 1, "test")) == []  # too few members


def test_lexical_judge_finds_the_intruder_of_a_lexical_feature_only():
    judge = LexicalJudge()
    good = asyncio.run(gate_feature(judge, _feature(True, "explain")))
    assert good.accuracy == 1.0 and good.details["chance"] == pytest.approx(0.2)
    e = Explanation("e1", "s", 2, "anything at all", "x", "m")
    res = asyncio.run(score_explanations([e], [_feature(False)], scorers="intruder", baselines=False))
    assert res.results[0].scorer == "intruder" and res.results[0].value < 1.0


def _intruder_reader(req):
    """An LLM judge: in each set, the text without ' def'."""
    sets = req.user_text.split("Set ")[1:]
    picks = []
    for block in sets:
        texts = re.findall(r"^Text (\d+): (.*)$", block, flags=re.M)
        picks.append(next((int(n) for n, t in texts if " def" not in t), 1))
    return json.dumps({"answers": picks})


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
def test_llm_judge_through_both_sdks_one_request_per_feature(fake_llm, spec):
    from featurescribe.llm import make_client

    fake_llm.responder = _intruder_reader
    e = Explanation("e1", "s", 1, "ignored", "x", "m")
    res = asyncio.run(score_explanations([e], [_feature(True)], simulator=spec, scorers="intruder",
                                         client=make_client(spec, use_cache=False), baselines=False))
    assert res.results[0].value == 1.0 and not res.failures
    assert len(fake_llm.requests) == 1 and fake_llm.requests[0].json_schema is not None
    assert "does not belong" in fake_llm.requests[0].messages[0]["content"]


def test_gate_leaves_uninterpretable_features_unlabelled_without_paying(labdb, fake_llm):
    """--gate intruder:0.6 with an API explainer and simulator: the gate asks one request per
    feature; features below it get status 'gated', `features.intruder`, and no explanation."""
    def reader(req):
        return _intruder_reader(req) if "does not belong" in req.messages[0]["content"] else _reader(req)

    fake_llm.responder = reader
    spec = "openai:gpt-4o-mini"
    assert _label(labdb, "--features", "2:6", "--explainer", spec, "--simulator", spec,
                  "--gate", "intruder:0.6") == 0
    rows = dict(q(labdb, "SELECT feature_id, status FROM features WHERE feature_id BETWEEN 2 AND 5"))
    acc = dict(q(labdb, "SELECT feature_id, intruder FROM features WHERE feature_id BETWEEN 2 AND 5"))
    assert rows[2] == "alive" and acc[2] >= 0.6  # planted on " def": every set's odd one is found
    gated = [f for f, s in rows.items() if s == "gated"]
    assert gated and all(acc[f] < 0.6 for f in gated)
    explained = {r[0] for r in q(labdb, "SELECT DISTINCT feature_id FROM explanations")}
    assert 2 in explained and not explained & set(gated)
    reason = q(labdb, f"SELECT skip_reason FROM features WHERE feature_id = {gated[0]}")[0][0]
    assert reason.startswith("intruder accuracy") and "below the gate 0.6" in reason
    calls = q(labdb, "SELECT purpose, count(*) FROM llm_calls WHERE status = 'ok' GROUP BY 1")
    assert dict(calls)["intruder"] == 4


def test_bad_gate_is_one_line(labdb, capsys):
    from tests.test_label import _cli

    assert _cli(labdb, "--gate", "intruder:2") != 0
    err = capsys.readouterr().err.strip()
    assert "bad --gate 'intruder:2'" in err and len(err.splitlines()) == 1
