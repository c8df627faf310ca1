"""The planted-feature bed: known rules, true explanations, and judges that must tell them apart."""

from __future__ import annotations

import asyncio

import pytest

from featurescribe.scorers import score_explanations
from featurescribe.testbed.planted import build_bed, default_plants, ranking_auc, word_tokenize


@pytest.fixture(scope="module")
def bed():
    return build_bed(tokenizer="words", max_tokens=30_000)


def test_word_tokenizer_keeps_spaces_and_splits_digits():
    assert word_tokenize("The cat (42),\nok") == ["The", " cat", " (", "4", "2", ")", ",", "\n", "ok"]


def test_rules_fire_where_they_say():
    plants = {p.name: p for p in default_plants()}
    toks = ["The", " sum", " (", "of", " 4", "2", ")", " is", " the", " x", ".", " Next"]
    assert [i for i, a in enumerate(plants["digits"].rule(toks)) if a] == [4, 5]
    assert [i for i, a in enumerate(plants["capitalised"].rule(toks)) if a] == [0, 11]
    assert [i for i, a in enumerate(plants["brackets"].rule(toks)) if a] == [3, 4, 5]
    assert [i for i, a in enumerate(plants["the"].rule(toks)) if a] == [0, 8]
    assert [i for i, a in enumerate(plants["after_dot"].rule(toks)) if a] == [11]


def test_bed_has_disjoint_splits_and_real_activations(bed):
    assert len(bed.examples) == len(bed.plants)
    for fe in bed.examples.values():
        seen = {}
        for w in fe.windows:
            key = (w.seq_id, w.start_pos)
            assert key not in seen, "a window is in two splits"
            seen[key] = w.split
            assert len(w.acts) == len(w.tokens) == 32
        for split in ("explain", "valid", "test"):
            assert fe.split(split, "top") and all(w.max_act > 0 for w in fe.split(split, "top"))
            assert fe.split(split, "random")
        assert fe.max_act == max(w.max_act for w in fe.windows)


@pytest.mark.parametrize("scorer", ["simulation", "detection", "fuzzing"])
def test_lexical_judges_rank_each_true_explanation_first_on_lexical_plants(bed, scorer):
    lexical = [p.feature_id for p in bed.plants if p.lexical]
    exps = bed.explanations(lexical)
    res = asyncio.run(score_explanations(exps, bed.examples, simulator="lexical", scorers=scorer,
                                         baselines=False))
    assert not res.failures
    ranking = ranking_auc(exps, res.results, scorer)
    assert set(ranking.per_feature) == set(lexical)
    for fid in lexical:
        assert ranking.true_best[fid], (scorer, bed.plant(fid).name, ranking.per_feature[fid])
    assert ranking.auc == 1.0
    # and the true explanation is clearly good, not merely the least bad
    value = {r.explanation_id: r.value for r in res.results}
    true = [value[f"planted-{f}-{bed.plant(f).name}"] for f in lexical]
    assert min(true) > (0.9 if scorer == "simulation" else 0.95)


def test_the_lexical_judge_cannot_read_context(bed):
    """Text inside brackets is not a token list: the lexical simulator scores its true
    explanation 0 (flagged), so it is no judge of contextual plants (the benchmark says so)."""
    fid = next(p.feature_id for p in bed.plants if p.name == "brackets")
    exps = [e for e in bed.explanations([fid]) if e.method == "true"]
    (res,) = asyncio.run(score_explanations(exps, bed.examples, simulator="lexical", baselines=False)).results
    assert res.value == 0.0 and res.details["flag"] == "constant_predicted"


@pytest.mark.slow
def test_bed_with_the_smollm2_tokenizer():
    from featurescribe.testbed.planted import smollm2_tokenize

    if smollm2_tokenize() is None:
        pytest.skip("smollm2-135m is not installed")
    bed = build_bed(tokenizer="smollm2", max_tokens=12_000,
                    n_top={"explain": 3, "valid": 2, "test": 4}, n_random={"explain": 2, "valid": 2, "test": 4})
    assert bed.tokenizer == "smollm2-135m"
    digits = bed.examples[("planted", 0)]
    for w in digits.split("test", "top"):
        fired = [t for t, a in zip(w.tokens, w.acts) if a > 0]
        assert fired and all(t.strip().isdigit() for t in fired)
