"""LLM simulators and judges through the real SDKs against the tests' local server, and the
all-at-once local simulator on the real SmolLM2-135M."""

from __future__ import annotations

import asyncio
import json
import math
import re

import numpy as np
import pytest

from featurescribe.records import Explanation, FeatureExamples, Window
from featurescribe.scorers import (
    LocalSimulator,
    LogprobSimulator,
    StructuredSimulator,
    make_simulator,
    score_explanations,
)
from featurescribe.scorers.simulators import parse_activation_lines
from featurescribe.llm.base import UnparseableResponse
from tests.fake_llm import Reply

TOKENS = ["def", " f", "(", "x", "):", "\n", " return", " x"]
ACTS = [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]


def run(coro):
    return asyncio.run(coro)


def client(spec, **kw):
    from featurescribe.llm import make_client

    return make_client(spec, use_cache=False, backoff_initial_s=0.0, backoff_jitter_s=0.0, **kw)


def _shown_tokens(user_text: str) -> list[str]:
    """The token lines of a simulate_logprobs prompt (after the blank line that ends the text),
    without the `### text i` lines of a several-window prompt."""
    return [ln for ln in user_text.split("\n\n")[-1].split("\n") if not ln.startswith("### text ")]


def logprob_reply(lines: list[str], dists: list[dict[str, float]]) -> Reply:
    """An answer `token<TAB>n` per line, with per-token logprobs: the token text as one sure
    token, the tab, then the number token whose alternatives are `dists[i]` (probabilities)."""
    text_parts, lps = [], []
    for i, (tok, dist) in enumerate(zip(lines, dists)):
        best = max(dist, key=dist.get)
        if tok:
            lps.append((tok, -0.01, {tok: -0.01}))
        lps.append(("\t", -0.01, {"\t": -0.01}))
        lps.append((best, math.log(dist[best]), {k: math.log(v) for k, v in dist.items()}))
        text_parts.append(f"{tok}\t{best}")
        if i < len(lines) - 1:
            lps.append(("\n", -0.01, {"\n": -0.01}))
    return Reply(text="\n".join(text_parts), logprobs=lps)


def test_parse_activation_lines_is_strict():
    assert parse_activation_lines("a\t1\n b\t10\n", 2) == [(2, 1), (7, 10)]
    assert parse_activation_lines("```\na\t0\n```", 1) == [(6, 0)]
    with pytest.raises(UnparseableResponse):
        parse_activation_lines("a\t1", 2)
    with pytest.raises(UnparseableResponse):
        parse_activation_lines("a\tlots\nb\t1", 2)
    with pytest.raises(UnparseableResponse):
        parse_activation_lines("a\t11", 1)


def test_openai_logprob_simulator_reads_expected_values(fake_llm):
    dists = [{"8": 0.5, "6": 0.25, "0": 0.25}] + [{"0": 0.9, "1": 0.1}] * 5 + [{"4": 1.0}, {"0": 0.7, "2": 0.3}]

    def responder(req):
        assert req.top_logprobs > 0
        assert "what the neuron responds to" in req.user_text.lower()
        return logprob_reply(_shown_tokens(req.user_text), dists)

    fake_llm.responder = responder
    c = client("openai:gpt-4o-mini")
    sim = make_simulator("openai:gpt-4o-mini", client=c)
    assert isinstance(sim, LogprobSimulator)
    w = Window(1, 0, TOKENS, ACTS, split="test")
    (pred,) = run(sim.simulate('the keywords "def" and "return"', [w]))
    expected = [sum(int(k) * v for k, v in d.items()) / sum(d.values()) for d in dists]
    assert pred == pytest.approx(expected)
    assert len(fake_llm.requests) == 1  # one request for the whole window


def test_openai_misaligned_answer_is_asked_again(fake_llm):
    answers = iter(["short", None])

    def responder(req):
        lines = _shown_tokens(req.user_text)
        a = next(answers)
        if a == "short":  # one line missing: the parse refuses it and the client asks again
            lines = lines[:-1]
        return logprob_reply(lines, [{"3": 1.0}] * len(lines))

    fake_llm.responder = responder
    sim = make_simulator("openai:gpt-4o-mini", client=client("openai:gpt-4o-mini"))
    (pred,) = run(sim.simulate("anything", [Window(1, 0, TOKENS, ACTS)]))
    assert pred == [3.0] * len(TOKENS)
    assert len(fake_llm.requests) == 2


def test_openai_without_logprobs_falls_back_to_structured_output(fake_llm):
    def responder(req):
        if req.json_schema is not None:
            n = int(re.search(r"exactly (\d+) whole numbers", req.user_text).group(1))
            return json.dumps({"activations": [5] + [0] * (n - 1)})
        return Reply(text="\n".join(f"{t}\t1" for t in _shown_tokens(req.user_text)))  # no logprobs

    fake_llm.responder = responder
    sim = make_simulator("openai:some-local-model", client=client("openai:some-local-model"))
    w = Window(1, 0, TOKENS, ACTS)
    assert run(sim.simulate("x", [w])) == [[5.0] + [0.0] * 7]
    assert run(sim.simulate("x", [w])) == [[5.0] + [0.0] * 7]
    kinds = [r.json_schema is not None for r in fake_llm.requests]
    assert kinds == [False, True, True]  # after one answer without logprobs: structured only


def test_anthropic_structured_simulator_retries_until_lengths_line_up(fake_llm):
    calls = []

    def responder(req):
        calls.append(req)
        n = int(re.search(r"exactly (\d+) whole numbers", req.user_text).group(1))
        assert req.json_schema is not None
        if len(calls) == 1:
            return json.dumps({"activations": [1] * (n + 2)})  # misaligned: asked again
        return json.dumps({"activations": [10 if i in (0, 6) else 0 for i in range(n)]})

    fake_llm.responder = responder
    sim = make_simulator("anthropic:claude-haiku-4-5", client=client("anthropic:claude-haiku-4-5"))
    assert isinstance(sim, StructuredSimulator)
    fe = FeatureExamples("s", 0, 3.0, [Window(1, 0, TOKENS, ACTS, split="test"),
                                       Window(2, 0, TOKENS, [0.0] * 8, kind="random", split="test")])
    e = Explanation("e1", "s", 0, 'the keywords "def" and "return"', "x", "m")
    res = run(score_explanations([e], [fe], simulator=sim, baselines=False))
    assert len(res.results) == 1 and not res.failures
    assert res.results[0].simulator == "anthropic:claude-haiku-4-5"
    assert res.results[0].value == pytest.approx(np.corrcoef(ACTS + [0.0] * 8, ([10, 0, 0, 0, 0, 0, 10, 0] * 2))[0, 1])
    assert len(calls) == 3  # two windows, one asked twice


def test_structured_simulator_that_never_lines_up_is_a_failure(fake_llm):
    fake_llm.responder = lambda req: json.dumps({"activations": [1, 2]})
    sim = make_simulator("anthropic:claude-haiku-4-5", client=client("anthropic:claude-haiku-4-5"))
    fe = FeatureExamples("s", 0, 3.0, [Window(1, 0, TOKENS, ACTS, split="test")])
    e = Explanation("e1", "s", 0, "anything", "x", "m")
    res = run(score_explanations([e], [fe], simulator=sim, baselines=False))
    assert res.results == [] and len(res.failures) == 1
    assert res.failures[0].scorer == "simulation"


def numbered_token_lists(user_text: str) -> list[list[str]]:
    """The tokens of a structured simulation prompt, one list per text (`### text i` lines start
    a new one; a single-window prompt is one text)."""
    lists: list[list[str]] = [[]]
    for line in user_text.split("\n"):
        if line.startswith("### text ") and lists[-1]:
            lists.append([])
        m = re.match(r"^\d+\. (.*)$", line)
        if m:
            lists[-1].append(m.group(1))
    return lists


def activations_answer(user_text: str, value) -> str:
    """A structured simulation answer, `value(token)` for each token, for a one- or
    several-window prompt."""
    lists = [[value(t) for t in tokens] for tokens in numbered_token_lists(user_text)]
    return json.dumps({"activations": lists if "### text" in user_text else lists[0]})


def _keyword_dist(tok: str) -> dict[str, float]:
    return {"9": 0.8, "7": 0.2} if tok.strip() in ("def", "return") else {"0": 0.9, "2": 0.1}


def _keyword_simulator_reply(req):
    """A judge that reads each token: 'def'/'return' high, the rest low, in the form the request
    asks for (JSON lists per window, or token lines with logprobs; `### text` lines dropped)."""
    if req.json_schema is not None:
        return activations_answer(req.user_text, lambda t: 9 if t.strip() in ("def", "return") else 0)
    lines = _shown_tokens(req.user_text)
    return logprob_reply(lines, [_keyword_dist(t) for t in lines])


@pytest.mark.parametrize("spec", ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"])
def test_several_windows_per_request_predict_what_one_per_request_does(fake_llm, spec):
    """--sim-windows-per-call: the same predictions (so the same score) in fewer requests."""
    fake_llm.responder = _keyword_simulator_reply
    windows = [Window(i, 0, TOKENS[i % 3:], ACTS[i % 3:], split="test") for i in range(7)]
    got = {}
    for k in (1, 3):
        fake_llm.reset()
        fake_llm.responder = _keyword_simulator_reply
        sim = make_simulator(spec, client=client(spec), windows_per_call=k)
        got[k] = run(sim.simulate('the keywords "def" and "return"', windows))
        assert len(fake_llm.requests) == (7 if k == 1 else 3)  # groups of 3, 3 and 1
    assert [v for p in got[3] for v in p] == pytest.approx([v for p in got[1] for v in p])
    assert [len(p) for p in got[3]] == [len(w.tokens) for w in windows]
    assert max(got[3][0]) > 5 and min(got[3][0]) < 1


def test_several_window_answer_with_a_missing_list_is_asked_again(fake_llm):
    calls = []

    def responder(req):
        calls.append(req)
        good = json.loads(_keyword_simulator_reply(req))
        return json.dumps({"activations": good["activations"][:-1]} if len(calls) == 1 else good)

    fake_llm.responder = responder
    sim = make_simulator("anthropic:claude-haiku-4-5", client=client("anthropic:claude-haiku-4-5"),
                         windows_per_call=4)
    out = run(sim.simulate("x", [Window(i, 0, TOKENS, ACTS) for i in range(4)]))
    assert len(out) == 4 and len(calls) == 2


def _answer_by_keyword(req) -> str:
    """A judge that reads the prompt: detection says 1 for texts holding ' return'; fuzzing
    says 1 when every marked span holds ' return' (only when the explanation mentions it)."""
    explanation = re.search(r"Explanation of the feature: (.*)", req.user_text).group(1)
    texts = re.findall(r"^Text \d+: (.*)$", req.user_text, flags=re.M)
    knows = "return" in explanation
    if "marked" in req.messages[0]["content"]:
        spans = [re.findall(r"<<(.*?)>>", t) for t in texts]
        answers = [int(knows and bool(s) and all("return" in x for x in s)) for s in spans]
    else:
        answers = [int(knows and " return" in t) for t in texts]
    return json.dumps({"answers": answers})


def test_llm_detection_and_fuzzing_judges_through_both_sdks(fake_llm):
    fake_llm.responder = _answer_by_keyword
    act = lambda toks: [2.0 if t == " return" else 0.0 for t in toks]  # noqa: E731
    texts = [
        ["def", " g", "():", " return", " 1"],
        [" if", " x", ":", " return", " y"],
        [" return", " None"],
        [" a", " =", " 1"],
        [" print", "(", "x", ")"],
        [" for", " i", " in", " r"],
    ]
    windows = [Window(i, 0, t, act(t), kind="top" if any(act(t)) else "random", split="test")
               for i, t in enumerate(texts)]
    fe = FeatureExamples("s", 3, 2.0, windows)
    exps = [Explanation("good", "s", 3, 'the token " return"', "x", "m"),
            Explanation("bad", "s", 3, "loops", "x", "m", candidate=1)]
    for spec in ("openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"):
        fake_llm.reset()
        c = client(spec)
        res = run(score_explanations(exps, [fe], simulator=spec, client=c,
                                     scorers="detection,fuzzing", batch_size=4, baselines=False))
        assert not res.failures
        by = {(r.explanation_id, r.scorer): r for r in res.results}
        assert by[("good", "detection")].value == 1.0
        assert by[("good", "fuzzing")].value == 1.0
        assert by[("bad", "detection")].value == 0.5
        assert by[("bad", "fuzzing")].value == 0.5
        d = by[("good", "fuzzing")].details
        assert d["n_positive"] == 3 and d["n_negative"] == 6 and d["judge"] == spec
        # batched: several windows per request, fewer requests than windows
        assert by[("good", "detection")].details["n_requests"] == 2
        assert len(fake_llm.requests) == 2 * (2 + 3)


# ----------------------------------------------------------------------------- local model
@pytest.mark.slow
def test_local_simulator_on_smollm2_reads_every_slot_in_one_pass(smollm2):
    from featurescribe.llm import make_client
    from featurescribe.llm.backends.local import register_local_model

    name, model, tokenizer = smollm2
    register_local_model(name, model, tokenizer)
    c = make_client(f"local:{name}", use_cache=False)
    sim = make_simulator(f"local:{name}", client=c)
    assert isinstance(sim, LocalSimulator)
    w = Window(1, 0, ["The", " year", " 1", "9", "8", "4", " was", " cold"], [0, 0, 1, 1, 1, 1, 0, 0])
    (pred,) = run(sim.simulate("numbers written with digits", [w]))
    assert sim.scale_max == 9  # "10" is two SmolLM2 tokens: the 0-9 scale
    assert len(pred) == len(w.tokens)
    assert all(0.0 <= p <= 9.0 and math.isfinite(p) for p in pred)
    assert len({round(p, 6) for p in pred}) > 1  # read at each slot, not one number copied
    assert len([r for r in c.ledger if r.purpose == "simulate"]) == 1  # one forward pass

    # the same slots read one at a time, from the text cut after each slot, give the same values
    text, positions = sim.build("numbers written with digits", w.tokens)
    one = [sim.expected(run(sim.window_probs(text[:p] + sim.SLOT, positions[: i + 1])))[-1]
           for i, p in enumerate(positions[:2])]
    assert one == pytest.approx(pred[:2], abs=1e-4)

    # the local model as a detection judge: one forward pass per batch, nothing to parse
    windows = [w, Window(2, 0, [" the", " cat", " sat"], [0.0, 0.0, 0.0], kind="random", split="test"),
               Window(3, 0, [" in", " 2", "0", "2", "4"], [0, 1, 1, 1, 1], split="test")]
    for x in windows:
        x.split = "test"
    fe = FeatureExamples("s", 0, 1.0, windows)
    e = Explanation("e", "s", 0, "numbers written with digits", "x", "m")
    res = run(score_explanations([e], [fe], simulator=sim, client=c, scorers="detection", baselines=False))
    assert not res.failures and res.results[0].simulator == f"local:{name}"
    assert 0.0 <= res.results[0].value <= 1.0 and res.results[0].n_examples == 3
    assert len([r for r in c.ledger if r.purpose == "detect"]) == 1


@pytest.mark.parametrize("windows_per_call", [1, 2])
def test_a_budget_stop_waits_for_the_windows_in_flight(fake_llm, store, windows_per_call):
    """The budget runs out while one window's request is still in flight: the simulation raises
    only once that request has answered, so its paid answer is in the ledger (and the cache) when
    the run closes its client, not cut off as a connection error and paid again by the re-run."""
    from featurescribe.llm import BudgetExceeded, make_client
    from featurescribe.llm.budget import Budget

    fake_llm.responder = lambda req: Reply(activations_answer(req.user_text, lambda t: 0), input_tokens=1_000_000)
    fake_llm.inject("slow", delay_s=1.0)  # the first request answers last
    c = make_client("anthropic:claude-haiku-4-5", store=store, budget=Budget(limit_usd=0.5), concurrency=2,
                    backoff_initial_s=0.0, backoff_jitter_s=0.0)
    sim = make_simulator("anthropic:claude-haiku-4-5", client=c, windows_per_call=windows_per_call)
    windows = [Window(i, 0, [f"w{i}", *TOKENS[1:]], ACTS) for i in range(3 * windows_per_call)]  # distinct prompts

    async def go():
        try:
            with pytest.raises(BudgetExceeded):
                await sim.simulate("the keywords def and return", windows)
        finally:
            await c.aclose()

    run(go())
    answered = [r for r in fake_llm.requests if r.status == 200]
    assert len(answered) == 2
    statuses = sorted(r["status"] for r in store.rows())
    assert statuses == ["budget", "ok", "ok"], store.rows()
