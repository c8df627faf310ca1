"""The registries: a backend, a scorer or a command is one entry, and everything else finds it."""

from __future__ import annotations

import asyncio
import json

import pytest

from featurescribe.cli import build_parser, command_table
from featurescribe.errors import FeaturescribeError
from featurescribe.flows.label_core import compute_chunk, prepare_chunk, select_features, write_chunk
from featurescribe.flows.label_options import LabelOptions
from featurescribe.llm.registry import BACKENDS, check_backend, is_llm_spec
from featurescribe.records import ScoreResult
from featurescribe.scorers import SCORERS, ScorerKind, parse_scorers, score_explanations
from featurescribe.store import open_db
from tests.script_backend import scripted
from tests.test_sampling import SOURCE, build_db

EXPLANATION = 'the tokens " def" and " class"'


def _answer(request) -> str:
    return json.dumps({"explanation": EXPLANATION})


def test_builtin_backends_and_their_capabilities():
    assert BACKENDS.names() == ("openai", "anthropic", "local")
    assert BACKENDS.where(batch_provider=True) == ("openai", "anthropic")
    assert BACKENDS.where(runs_locally=True) == ("local",)
    assert not is_llm_spec("lexical") and not is_llm_spec("baseline:tokens") and is_llm_spec("local:x")


def test_a_registered_backend_is_an_explainer_and_simulator_everywhere(db_path):
    with pytest.raises(FeaturescribeError, match="unknown explainer 'script:m'"):
        LabelOptions(source=SOURCE, explainer="script:m")
    with scripted(_answer) as script:
        options = LabelOptions(source=SOURCE, features="2:4", explainer="script:m", simulator="lexical")
        check_backend("script:m")
        con = open_db(db_path)
        build_db(con, n_features=6)
        prepared = prepare_chunk(con, options, select_features(con, SOURCE, options.features))
        result = asyncio.run(compute_chunk(prepared, options, run_id="r1"))
        counts = write_chunk(con, result, run_id="r1")
        con.close()
    assert "script" not in BACKENDS.names()
    assert result.labelled == [2, 3] and counts.explanations == 2
    assert [r.purpose for r in script.requests] == ["explain", "explain"]
    assert {r.explanation.text for r in result.explanations} == {EXPLANATION}


async def _length_scorer(e, ctx):
    fe, windows = ctx.windows_of(e)
    return ScoreResult(e.explanation_id, "length", float(len(e.text.split())), None, len(windows),
                       split=ctx.split)


def test_a_registered_scorer_is_chosen_by_name_and_runs(db_path):
    from featurescribe.testbed.planted import build_bed

    with pytest.raises(ValueError, match="unknown scorer"):
        parse_scorers("simulation,length")
    SCORERS.register(ScorerKind("length", _length_scorer))
    try:
        assert parse_scorers("simulation,length") == ["simulation", "length"]
        assert LabelOptions(source=SOURCE, scorers="length").scorer_names == ("length",)
        bed = build_bed(tokenizer="words", max_tokens=4000)
        exps = [e for e in bed.explanations() if e.method == "true"][:2]
        out = asyncio.run(score_explanations(exps, bed.examples, scorers="length,simulation"))
    finally:
        SCORERS.unregister("length")
    assert not out.failures
    assert [r.scorer for r in out.results] == ["simulation", "length"] * 2
    assert out.results[1].value == len(exps[0].text.split())


def test_the_command_table_is_the_cli():
    names = [c.name for c in command_table()]
    assert len(names) == len(set(names))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == names
