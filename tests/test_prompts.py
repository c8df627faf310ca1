"""Snapshots of every prompt template, rendered by the code that sends it for one fixed feature.

A change to a prompt (its file or the code that fills it in) changes a file under
tests/prompt_snapshots/ and so shows as a diff. After a deliberate change, rewrite them with
`FEATURESCRIBE_UPDATE_SNAPSHOTS=1 pytest tests/test_prompts.py` and commit the diff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import pytest

from featurescribe.labelers import ANSWERS, METHODS, render_explain_prompt
from featurescribe.llm import make_client
from featurescribe.prompts import template_names
from featurescribe.records import FeatureExamples, Window
from featurescribe.scorers import classify as cls
from featurescribe.scorers.simulators import LocalSimulator, LogprobSimulator, StructuredSimulator
from tests.script_backend import scripted

SNAPSHOTS = Path(__file__).parent / "prompt_snapshots"
EXPLANATION = 'the tokens " def" and " class" at the start of a definition'


def _feature() -> FeatureExamples:
    def w(seq, tokens, acts, split, kind="top"):
        return Window(seq_id=seq, start_pos=0, tokens=tokens, acts=acts, kind=kind, split=split)

    return FeatureExamples("6-mlp", 17, 4.0, [
        w(1, ["\n", "def", " main", "(", "):"], [0.0, 4.0, 0.5, 0.0, 0.0], "explain"),
        w(2, ["class", " Foo", ":", "\t", "pass"], [3.0, 0.0, 0.0, 0.0, 0.0], "explain"),
        w(3, ["x", " =", " 1"], [0.0, 0.0, 0.0], "explain", kind="random"),
        w(4, ["def", " f", "(", "x", ")"], [3.5, 0.2, 0.0, 0.0, 0.0], "test"),
        w(5, ["print", "(", "'hi'", ")", "\n"], [0.0, 0.0, 0.0, 0.0, 0.0], "test", kind="random"),
    ])


def _text(messages) -> str:
    return "".join(f"[{m['role']}]\n{m['content']}\n" for m in messages)


def _answer(request, n: int = 5) -> str:
    """Valid answers for n tokens or windows, so each simulator and judge sends one request."""
    schema = json.dumps(request.json_schema or {})
    if "activations" in schema:
        return json.dumps({"activations": [0] * n})
    if "answers" in schema:
        return json.dumps({"answers": [0] * n})
    return "\n".join("tok\t0" for _ in range(n))


def _multi_answer(request, lengths: list[int]) -> str:
    """Valid answers to a several-window simulation request."""
    if "activations" in json.dumps(request.json_schema or {}):
        return json.dumps({"activations": [[0] * n for n in lengths]})
    return "\n".join("tok\t0" for _ in range(sum(lengths)))


def _explain_cases() -> dict[str, str]:
    fe = _feature()
    out = {}
    for method in METHODS:
        for answer in ANSWERS:
            name = f"explain_{method}" + ("_text" if answer == "text" else "")
            out[name] = _text(render_explain_prompt(fe, method, None, answer))
    out["explain_pairs+explain_logit_lens"] = _text(render_explain_prompt(
        dataclasses.replace(fe, promoted=["def", " class", " lambda"]), "pairs", None, "json"))
    out["explain_pairs+explain_output_effects"] = _text(render_explain_prompt(
        dataclasses.replace(fe, output_rising=[" def", "\n"], output_falling=[" the"]), "pairs", None, "json"))
    return out


def _intervention_cases() -> dict[str, str]:
    from featurescribe.scorers.intervention import LLMPairJudge, LocalPairJudge
    from featurescribe.steer.calibrate import _all_neutral_prompts

    pairs = [("The", " def main():", " weather was"), ("I think that", " it rained", " class Foo:\n")]
    out = {"steer_neutral": "\n".join(_all_neutral_prompts()) + "\n"}
    with scripted(lambda r: json.dumps({"answers": ["A", "B"]})) as script:
        asyncio.run(LLMPairJudge(make_client("script:any", use_cache=False)).pick(EXPLANATION, pairs))
        out["intervention_batch"] = _text(script.requests[0].messages)
    with scripted(_answer, candidate_probs=True) as script:
        asyncio.run(LocalPairJudge(make_client("script:any")).pick(EXPLANATION, pairs))
        messages, text = script.prob_calls[0]
        out["intervention_local"] = _text(messages) + "[assistant, scored]\n" + text
    return out


def _simulate_cases() -> dict[str, str]:
    fe = _feature()
    window = fe.split("test")[0]
    out = {}
    with scripted(_answer) as script:
        client = make_client("script:any", use_cache=False)
        asyncio.run(StructuredSimulator(client).simulate_window(EXPLANATION, window, fe))
        asyncio.run(LogprobSimulator(client).simulate_window(EXPLANATION, window, fe))
        out["simulate_json"] = _text(script.requests[0].messages)
        out["simulate_logprobs"] = _text(script.requests[1].messages)
    windows = fe.split("test")
    with scripted(lambda r: _multi_answer(r, [len(w.tokens) for w in windows])) as script:
        client = make_client("script:any", use_cache=False)
        asyncio.run(StructuredSimulator(client, windows_per_call=5).simulate(EXPLANATION, windows, fe))
        asyncio.run(LogprobSimulator(client, windows_per_call=5).simulate(EXPLANATION, windows, fe))
        out["simulate_json_multi"] = _text(script.requests[0].messages)
        out["simulate_logprobs_multi"] = _text(script.requests[1].messages)
    with scripted(_answer, candidate_probs=True):
        sim = LocalSimulator(make_client("script:any"))
        for scale in (10, 9):
            text, positions = sim.build(EXPLANATION, window.tokens, scale)
            out[f"simulate_local_0-{scale}"] = text + "".join(f"@{p}\n" for p in positions)
    return out


def _judge_cases() -> dict[str, str]:
    fe = _feature()
    windows = fe.split("test")
    out = {}
    for task, prefix in (("detection", "detect"), ("fuzzing", "fuzz")):
        samples, batches = cls.prepare(task, windows, fe.max_act, 8, (fe.source_id, fe.feature_id, "test"))
        with scripted(lambda r: _answer(r, len(batches[0]))) as script:
            asyncio.run(cls.LLMJudge(make_client("script:any")).judge(task, EXPLANATION, batches[0]))
            out[f"{prefix}_batch"] = _text(script.requests[0].messages)
        with scripted(_answer, candidate_probs=True) as script:
            asyncio.run(cls.LocalJudge(make_client("script:any")).judge(task, EXPLANATION, batches[0]))
            messages, text = script.prob_calls[0]
            out[f"{prefix}_local"] = _text(messages) + "[assistant, scored]\n" + text
    return out


def _intruder_cases() -> dict[str, str]:
    from featurescribe.scorers.intruder import IntruderSet

    fe = _feature()
    sets = [IntruderSet(fe.windows[:3], 2), IntruderSet(fe.windows[2:5], 0)]
    out = {}
    with scripted(lambda r: json.dumps({"answers": [1, 2]})) as script:
        asyncio.run(cls.LLMJudge(make_client("script:any", use_cache=False)).intruders(sets))
        out["intruder_batch"] = _text(script.requests[0].messages)
    with scripted(_answer, candidate_probs=True) as script:
        asyncio.run(cls.LocalJudge(make_client("script:any")).intruders(sets))
        messages, text = script.prob_calls[0]
        out["intruder_local"] = _text(messages) + "[assistant, scored]\n" + text
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {**_explain_cases(), **_simulate_cases(), **_judge_cases(), **_intervention_cases(),
            **_intruder_cases()}


def test_every_template_has_a_snapshot(rendered):
    covered = {t for name in rendered for t in name.replace("_0-10", "").replace("_0-9", "").split("+")}
    assert set(template_names()) <= covered, sorted(set(template_names()) - covered)


def test_rendered_prompts_match_their_snapshots(rendered):
    if os.environ.get("FEATURESCRIBE_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.mkdir(exist_ok=True)
        for old in SNAPSHOTS.glob("*.txt"):
            old.unlink()
        for name, text in rendered.items():
            (SNAPSHOTS / f"{name}.txt").write_text(text, encoding="utf-8")
    stored = {p.stem: p.read_text(encoding="utf-8") for p in SNAPSHOTS.glob("*.txt")}
    assert sorted(stored) == sorted(rendered), "snapshots added or gone: rewrite them (see the docstring)"
    changed = [name for name in rendered if rendered[name] != stored[name]]
    assert not changed, f"prompts changed: {changed} (see the docstring to accept the change)"
