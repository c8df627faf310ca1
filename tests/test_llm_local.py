"""`local:` backend with the real SmolLM2-135M (one model load: the session fixture `smollm2`)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from featurescribe.llm import CallStore, ChatRequest, make_client
from featurescribe.llm.backends.local import candidate_token_ids, register_local_model, render_chat

pytestmark = pytest.mark.slow

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def local_name(smollm2):
    name, model, tokenizer = smollm2
    register_local_model(name, model, tokenizer)  # the client shares the session's model
    return name


def test_chat_generation_and_ledger(local_name, con):
    store = CallStore(con)
    client = make_client(f"local:{local_name}", store=store, run_id="r")
    assert client.backend == "local" and client.supports_candidate_probs

    async def go():
        r = await client.chat(ChatRequest(
            messages=({"role": "user", "content": "What colour is the sky? One word."},), max_tokens=32,
            purpose="explain"))
        await client.aclose()
        return r

    resp = asyncio.run(go())
    assert resp.text.strip() != ""
    assert resp.input_tokens > 5 and resp.output_tokens > 0
    assert resp.finish_reason == "stop"  # a cut answer would have been asked again
    rows = store.rows()
    store.close()
    assert len(rows) == resp.attempts
    assert all(r["backend"] == "local" and r["cost_usd"] == 0 for r in rows)
    assert rows[-1]["status"] == "ok"


def test_greedy_generation_is_deterministic_and_gives_logprobs(local_name):
    client = make_client(f"local:{local_name}")
    backend = client._backend  # one attempt, whatever its finish reason
    request = ChatRequest(messages=({"role": "user", "content": "Count: 1, 2, 3,"},), max_tokens=6,
                          top_logprobs=3)

    async def go():
        return [await backend.send(request, max_tokens=6, timeout=0) for _ in range(2)]

    a, b = asyncio.run(go())
    assert a.text == b.text
    assert a.logprobs is not None and len(a.logprobs) >= 1
    first = a.logprobs[0]
    assert len(first.top) == 3 and first.logprob <= 0
    assert max(first.top.values()) == pytest.approx(first.logprob, abs=1e-4)  # greedy: the top token


def test_candidate_probs_one_forward_pass(local_name, smollm2):
    import torch

    _, model, tok = smollm2
    client = make_client(f"local:{local_name}")
    text = "the\t0\ncat\t7\nsat\t"
    positions = [i + 1 for i, ch in enumerate(text) if ch == "\t"]  # the slot after each tab
    messages = [{"role": "user", "content": "Rate each token 0-9."}]

    probs = asyncio.run(client.candidate_probs(text, positions, DIGITS, messages=messages))
    assert probs.shape == (3, 10)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)

    raw = asyncio.run(client.candidate_probs(text, positions, DIGITS, messages=messages, normalize=False))
    assert np.all(raw.sum(axis=1) <= 1.0 + 1e-6)
    # (the second call reuses the first one's key/value cache: equal up to float rounding)
    np.testing.assert_allclose(raw / raw.sum(axis=1, keepdims=True), probs, rtol=1e-4, atol=1e-7)

    # the same numbers as one forward pass per position over the prefix
    prefix = render_chat(tok, messages)
    cand = candidate_token_ids(tok, DIGITS)
    for row, pos in enumerate(positions):
        ids = tok.encode(prefix, add_special_tokens=False)
        start = 0
        for cut in positions:
            if cut > pos:
                break
            ids += tok.encode(text[start:cut], add_special_tokens=False)
            start = cut
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(logits.float(), -1)[cand].numpy()
        np.testing.assert_allclose(p / p.sum(), probs[row], rtol=2e-3, atol=1e-5)


def test_candidate_probs_reuses_a_shared_prompt_prefix(local_name, smollm2):
    """Windows of one feature share the instructions and the explanation: the second prompt
    computes only what differs, with the same probabilities as a fresh pass."""
    from featurescribe.llm.backends.local import get_local_model

    _, model, _ = smollm2
    client = make_client(f"local:{local_name}")
    lm = get_local_model(local_name)
    messages = [{"role": "user", "content": "Rate how much each token is about animals, 0-9. " * 4}]
    texts = ["the\t0\ncat\t7\nsat\t", "the\t0\ndog\t8\nran\t"]
    positions = [[i + 1 for i, ch in enumerate(t) if ch == "\t"] for t in texts]
    fed = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        lm.prefixes.clear()
        asyncio.run(client.candidate_probs(texts[0], positions[0], DIGITS, messages=messages))
        second = asyncio.run(client.candidate_probs(texts[1], positions[1], DIGITS, messages=messages))
        lm.prefixes.clear()
        fresh = asyncio.run(client.candidate_probs(texts[1], positions[1], DIGITS, messages=messages))
    finally:
        hook.remove()
    full, reused, again = fed
    assert full == again and reused < full - 40  # the shared chat prompt was not computed again
    np.testing.assert_allclose(second, fresh, atol=2e-4)


def test_candidate_probs_refuses_multi_token_candidates(local_name):
    client = make_client(f"local:{local_name}")
    with pytest.raises(ValueError, match="single-token"):
        asyncio.run(client.candidate_probs("a\t", [2], ["0", "10"]))


def test_remote_clients_have_no_candidate_probs(fake_llm):
    client = make_client("openai:gpt-4o-mini")
    assert not client.supports_candidate_probs
    with pytest.raises(NotImplementedError):
        asyncio.run(client.candidate_probs("a", [1], ["0"]))


def test_local_explainer_answers_in_plain_text(local_name, con):
    """SmolLM2-135M rarely writes JSON; the local explainer asks for a phrase that completes the
    prefilled answer, and the phrase passes the strict checks (not that it is a good one)."""
    from featurescribe.labelers import make_explainer
    from featurescribe.records import FeatureExamples, Window

    texts = [[" The", " price", " is", " 4", "2", " dollars", "."],
             [" In", " 1", "9", "9", "8", " we", " moved", "."],
             [" Call", " 5", "5", "5", " now", "."]]
    windows = [Window(seq_id=i, start_pos=0, tokens=t, acts=[5.0 if x.strip().isdigit() else 0.0 for x in t],
                      kind="top", split="explain") for i, t in enumerate(texts)]
    feature = FeatureExamples("0-mlp", 1, 5.0, windows)
    store = CallStore(con)
    client = make_client(f"local:{local_name}", store=store, run_id="r")
    explainer = make_explainer(f"local:{local_name}", client=client)

    async def go():
        try:
            return await explainer.explain(feature)
        finally:
            await client.aclose()

    (outcome,) = asyncio.run(go())
    rows = store.rows()
    store.close()
    assert outcome.ok, outcome.error
    assert 2 <= len(outcome.text.split()) <= 25 and "<<" not in outcome.text
    assert rows and all(r["purpose"] == "explain" for r in rows) and rows[-1]["status"] == "ok"


def test_candidate_probs_pass_the_cache_by_the_name_transformers_wants(local_name):
    """`past_key_values=` made transformers 5 print a FutureWarning in every no-key demo."""
    import warnings

    from featurescribe.llm.backends.local import get_local_model

    client = make_client(f"local:{local_name}")
    get_local_model(local_name).prefixes.clear()
    messages = [{"role": "user", "content": "Rate how much each token is about animals, 0-9. " * 4}]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for text in ("the\t0\ncat\t7\nsat\t", "the\t0\ndog\t8\nran\t"):  # the second reuses the first's cache
            asyncio.run(client.candidate_probs(text, [text.index("\t") + 1], DIGITS, messages=messages))
    assert not [w for w in seen if "past_key_values" in str(w.message)], [str(w.message) for w in seen]
