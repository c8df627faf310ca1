"""Explainers: prompt rendering, strict parsing, the real SDKs against the fake server, baseline."""

from __future__ import annotations

import asyncio
import json

import pytest

from featurescribe.labelers import (
    EXPLANATION_SCHEMA,
    LLMExplainer,
    TokenListExplainer,
    make_explainer,
    parse_explanation,
    parse_text_explanation,
    render_explain_prompt,
)
from featurescribe.llm.base import ChatResponse, UnparseableResponse
from featurescribe.records import FeatureExamples, Window
from featurescribe.scorers.lexical import quoted_strings


def small_feature() -> FeatureExamples:
    """Two explain windows (a top and a quantile one), and held-out windows that must not show."""
    return FeatureExamples("3-test", 7, max_act=9.0, windows=[
        Window(seq_id=4, start_pos=10, tokens=["x", " =", " (", "1", ")"],
               acts=[0.0, 0.0, 8.0, 0.0, 4.1], kind="top", split="explain"),
        Window(seq_id=9, start_pos=0, tokens=["f", "(", "a\n", ")"],
               acts=[0.0, 2.0, 0.0, 0.5], kind="quantile", split="explain", quantile=2),
        Window(seq_id=11, start_pos=3, tokens=["SECRET", " ("], acts=[0.0, 7.0],
               kind="top", split="test"),
        Window(seq_id=12, start_pos=3, tokens=["HIDDEN", " ("], acts=[0.0, 6.0],
               kind="top", split="valid"),
    ])


EXPECTED_PAIRS_USER = """2 excerpts of text with the feature's activation on each token:

Excerpt 1:
x\t0
 =\t0
 (\t10
1\t0
)\t5

Excerpt 2:
f\t0
(\t2
a\\n\t0
)\t0

What does the feature respond to? Answer with {"explanation": "..."}."""

EXPECTED_HIGHLIGHTED_USER = """2 excerpts of text, the feature's active tokens marked with << >>:

Excerpt 1: x =<< (>>1<<)>>
Active tokens: " (" 10, ")" 5

Excerpt 2: f<<(>>a\\n)
Active tokens: "(" 2

What does the feature respond to? Answer with {"explanation": "..."}."""


def test_pairs_prompt_renders_expected_text():
    messages = render_explain_prompt(small_feature(), "pairs")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == EXPECTED_PAIRS_USER
    assert "one token per line" in messages[0]["content"]
    assert '{"explanation": "..."}' in messages[0]["content"]


def test_highlighted_prompt_renders_expected_text():
    messages = render_explain_prompt(small_feature(), "highlighted")
    assert messages[1]["content"] == EXPECTED_HIGHLIGHTED_USER
    assert "<< and >>" in messages[0]["content"]


EXPECTED_MARKED_TEXT_USER = """Excerpts:
- x =<< (>>1<<)>>
- f<<(>>a\\n)

What do the marked tokens have in common? Answer in one short sentence."""


def test_marked_text_prompt_renders_expected_text_and_ends_with_a_prefill():
    messages = render_explain_prompt(small_feature(), "marked", answer="text")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == EXPECTED_MARKED_TEXT_USER
    assert messages[2]["content"] == "Explanation: the feature is active on"
    assert "JSON" not in "\n".join(m["content"] for m in messages)
    json_marked = render_explain_prompt(small_feature(), "marked")
    assert [m["role"] for m in json_marked] == ["system", "user"]
    assert "\n\n- x =<< (>>1<<)>>\n- f<<(>>a\\n)\n\n" in json_marked[1]["content"]


def test_local_explainers_default_to_marked_windows_and_a_text_answer():
    class Local:
        spec = "local:smollm2-135m"

    class Api:
        spec = "openai:gpt-4o-mini"

    local = make_explainer("local:smollm2-135m", client=Local())
    assert (local.method, local.answer, local.max_windows) == ("marked", "text", 8)
    req = local.request(small_feature())
    assert req.json_schema is None and req.max_tokens <= 64 and req.messages[-1]["role"] == "assistant"
    api = make_explainer("openai:gpt-4o-mini", client=Api())
    assert (api.method, api.answer, api.max_windows) == ("pairs", "json", None)
    assert make_explainer("local:x", client=Local(), method="pairs", answer="json").answer == "json"


def test_prompt_shows_only_the_explain_split():
    for method in ("pairs", "highlighted", "marked"):
        text = "\n".join(m["content"] for m in render_explain_prompt(small_feature(), method))
        assert "SECRET" not in text and "HIDDEN" not in text
    only_top = render_explain_prompt(small_feature(), "pairs", max_windows=1)[1]["content"]
    assert only_top.startswith("1 excerpts") and "Excerpt 2" not in only_top


@pytest.mark.parametrize("text,ok", [
    ('{"explanation": "  opening   brackets "}', "opening brackets"),
    ('{"explanation": ""}', None),
    ('{"explanation": "   "}', None),
    ('{"explanation": 3}', None),
    ('{"answer": "x"}', None),
    ('["x"]', None),
    ("opening brackets", None),
    ("", None),
    ('{"explanation": "' + "word " * 200 + '"}', None),
])
def test_parse_explanation_is_strict(text, ok):
    resp = ChatResponse(text=text)
    if ok is None:
        with pytest.raises(UnparseableResponse):
            parse_explanation(resp)
    else:
        assert parse_explanation(resp) == ok


@pytest.mark.parametrize("text,finish,ok", [
    (' the token " def" at the start of a line.', "stop", 'the token " def" at the start of a line'),
    (" numbers written with digits\nExcerpt 3: ...", "length", "numbers written with digits"),
    ('The feature responds to the words "if" and "else"', "stop", 'the words "if" and "else"'),
    ('Explanation: capitalized words. They start sentences', "length", "capitalized words"),
    (' "opening brackets"', "stop", "opening brackets"),
    (' the token "." at the end of sentences. More', "length", 'the token "." at the end of sentences'),
    (" the server, which accepts connections and", "length", None),  # cut before the phrase ended
    ("", "stop", None),
    (" the", "stop", None),  # one word
    (" <<the>> cat sat", "stop", None),  # copies the marks back
    (' the token "Excerpt 8: "', "stop", None),
    (" x\t7", "stop", None),
    (" " + "word " * 30 + ".", "stop", None),  # over 25 words
])
def test_parse_text_explanation_is_strict(text, finish, ok):
    resp = ChatResponse(text=text, finish_reason=finish)
    if ok is None:
        with pytest.raises(UnparseableResponse):
            parse_text_explanation(resp)
    else:
        assert parse_text_explanation(resp) == ok


def _client(spec: str, **kw):
    from featurescribe.llm.client import make_client

    return make_client(spec, backoff_initial_s=0.0, backoff_jitter_s=0.0, backoff_max_s=0.0, **kw)


@pytest.mark.parametrize("spec,api", [("openai:gpt-4o-mini", "openai"),
                                      ("anthropic:claude-haiku-4-5", "anthropic")])
def test_llm_explainer_through_the_real_sdk(fake_llm, spec, api):
    fake_llm.responder = lambda req: json.dumps({"explanation": 'opening brackets " ("'})
    feature = small_feature()

    async def go():
        client = _client(spec)
        try:
            return await LLMExplainer(client, "pairs").explain(feature), client
        finally:
            await client.aclose()

    outcomes, client = asyncio.run(go())
    assert len(outcomes) == 1 and outcomes[0].ok
    assert outcomes[0].text == 'opening brackets " ("'
    reqs = fake_llm.requests_for(api)
    assert len(reqs) == 1
    assert reqs[0].json_schema is not None
    assert reqs[0].json_schema.get("properties", {}).keys() == EXPLANATION_SCHEMA["properties"].keys()
    assert EXPECTED_PAIRS_USER in reqs[0].user_text
    assert [r.status for r in client.ledger] == ["ok"]


def test_candidates_are_sampled_with_distinct_seeds(fake_llm):
    answers = iter(["commas", "brackets", "parentheses"])
    fake_llm.responder = lambda req: json.dumps({"explanation": next(answers)})

    async def go():
        client = _client("openai:gpt-4o-mini")
        try:
            return await LLMExplainer(client, "highlighted").explain(small_feature(), n=3)
        finally:
            await client.aclose()

    outcomes = asyncio.run(go())
    assert [o.candidate for o in outcomes] == [0, 1, 2]
    assert [o.seed for o in outcomes] == [1, 2, 3]
    assert sorted(o.text for o in outcomes) == ["brackets", "commas", "parentheses"]
    reqs = fake_llm.requests_for("openai")
    assert len(reqs) == 3
    assert all(r.body.get("temperature", 0) > 0 for r in reqs)
    assert sorted(r.body.get("seed") for r in reqs) == [1, 2, 3]


def test_unparseable_answers_are_retried_then_failed(fake_llm):
    fake_llm.responder = lambda req: "I think it is about brackets."  # never JSON

    async def go():
        client = _client("openai:gpt-4o-mini", max_parse_retries=2)
        try:
            return await LLMExplainer(client, "pairs").explain(small_feature()), client
        finally:
            await client.aclose()

    outcomes, client = asyncio.run(go())
    assert not outcomes[0].ok and outcomes[0].text is None
    assert "LLMCallFailed" in outcomes[0].error
    assert len(fake_llm.requests_for("openai")) == 3  # asked, then asked again twice
    assert [r.status for r in client.ledger] == ["parse_error"] * 3


def test_one_bad_answer_then_a_good_one(fake_llm):
    fake_llm.inject("malformed")
    fake_llm.responder = lambda req: json.dumps({"explanation": "brackets"})

    async def go():
        client = _client("anthropic:claude-haiku-4-5")
        try:
            return await LLMExplainer(client, "pairs").explain(small_feature())
        finally:
            await client.aclose()

    outcomes = asyncio.run(go())
    assert outcomes[0].text == "brackets"
    assert len(fake_llm.requests_for("anthropic")) == 2


def _planted_feature() -> FeatureExamples:
    """A feature that fires on " def" (5), " class" (3) and " return" (2), weakly on " the"."""
    import numpy as np

    rng = np.random.default_rng(1)
    vocab = [" the", " cat", " def", " class", " return", "(", ")", " x"]
    strength = {" def": 5.0, " class": 3.0, " return": 2.0}
    windows = []
    for i in range(20):
        toks = [vocab[t] for t in rng.integers(0, len(vocab), 16)]
        toks[5] = [" def", " class", " return"][i % 3]
        acts = [strength.get(t, 0.0) * float(rng.uniform(0.9, 1.0)) for t in toks]
        acts = [a if a else (0.05 if t == " the" else 0.0) for a, t in zip(acts, toks)]
        windows.append(Window(seq_id=i, start_pos=0, tokens=toks, acts=acts, kind="top", split="explain"))
    windows.append(Window(seq_id=99, start_pos=0, tokens=[" cat", " x"], acts=[9.0, 9.0],
                          kind="top", split="test"))  # held out: must not be named
    return FeatureExamples("3-test", 2, max_act=5.0, windows=windows)


def test_baseline_names_the_tokens_the_feature_fires_on():
    explainer = make_explainer("baseline:tokens")
    assert isinstance(explainer, TokenListExplainer)
    outcomes = asyncio.run(explainer.explain(_planted_feature(), n=3))
    assert len(outcomes) == 1  # deterministic: one candidate whatever n
    text = outcomes[0].text
    assert text == 'the tokens " def", " class" and " return"'
    # the lexical simulator reads the same tokens back
    assert quoted_strings(text) == ["def", "class", "return"]


def test_baseline_quotes_awkward_tokens():
    fe = FeatureExamples("s", 1, 1.0, [Window(0, 0, ['"', " a"], [1.0, 0.0])])
    assert asyncio.run(TokenListExplainer().explain(fe))[0].text == 'the token `"`'
    fe = FeatureExamples("s", 1, 1.0, [Window(0, 0, ["x"], [0.0])])
    out = asyncio.run(TokenListExplainer().explain(fe))[0]
    assert not out.ok and "no activations" in out.error


def test_make_explainer_rejects_non_explainers():
    with pytest.raises(ValueError, match="simulator, not an explainer"):
        make_explainer("lexical")
    with pytest.raises(ValueError, match="unknown"):
        make_explainer("baseline:words")
    with pytest.raises(ValueError, match="needs an LLM client"):
        make_explainer("openai:gpt-4o-mini")
