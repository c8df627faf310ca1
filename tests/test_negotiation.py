"""Capability negotiation (llm/negotiation.py) with the real openai SDK against a 127.0.0.1 server
that refuses what llama.cpp's server and others refuse (tests/fake_llm.py dialects)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from featurescribe.llm import ChatRequest, LLMCallFailed, make_client
from featurescribe.llm.negotiation import RequestRejected, refused_feature
from featurescribe.scorers.registry import llm_simulator
from featurescribe.scorers.simulators import LogprobSimulator, StructuredSimulator
from tests.fake_llm import LLAMA_CPP_JSON_SCHEMA_ERROR, Reply, simple_logprobs

SCHEMA = {"type": "object", "properties": {"explanation": {"type": "string"}},
          "required": ["explanation"], "additionalProperties": False}
# a refusal retried as an outage would wait seconds: these tests would then take minutes
SLOW_BACKOFF = dict(backoff_initial_s=5.0, backoff_max_s=5.0, backoff_jitter_s=0.0, timeout_s=5.0)


@pytest.fixture(autouse=True)
def _fresh_limiters(fresh_limiters):
    yield


@pytest.fixture
def llama(fake_llm):
    fake_llm.refuse.update({"response_format.json_schema": (500, LLAMA_CPP_JSON_SCHEMA_ERROR)})
    return fake_llm


def req(**kw) -> ChatRequest:
    return ChatRequest(messages=({"role": "system", "content": "You explain features."},
                                 {"role": "user", "content": "explain"}), **kw)


def explanation(resp):
    return resp.json()["explanation"]


async def ask(client, *requests, parse=explanation):
    try:
        return [await client.chat(r, parse) for r in requests]
    finally:
        await client.aclose()


def client_for(store, **kw):
    return make_client("openai:smollm2", store=store, run_id="run-1", **{**SLOW_BACKOFF, **kw})


def forms(server) -> list[str | None]:
    return [(r.body.get("response_format") or {}).get("type") for r in server.requests]


def test_llama_cpp_json_schema_refusal_moves_to_json_object_at_once(llama, store, con):
    t0 = time.monotonic()
    out = asyncio.run(ask(client_for(store), req(json_schema=SCHEMA, seed=1), req(json_schema=SCHEMA, seed=2)))
    assert time.monotonic() - t0 < 4.0  # no backoff: the refusal is not an outage
    assert out == ["ok", "ok"]
    assert forms(llama) == ["json_schema", "json_object", "json_object"]
    # json_object: the schema is stated in the prompt, and sent for a server that enforces it
    assert json.dumps(SCHEMA, separators=(",", ":")) in llama.requests[1].messages[0]["content"]
    assert llama.requests[1].body["response_format"] == {"type": "json_object", "schema": SCHEMA}
    rows = store.rows()
    assert [r["status"] for r in rows] == ["error", "ok", "ok"]
    assert rows[0]["error"].startswith("request rejected (HTTP 500: 1 validation error: response_format")
    assert "json_schema -> json_object" in rows[0]["error"]
    assert con.execute("SELECT base_url, model, structured, logprobs FROM llm_capabilities").fetchall() == [
        (llama.base_url_openai, "smollm2", "json_object", True)]


def test_the_next_run_starts_with_the_remembered_form(llama, store):
    asyncio.run(ask(client_for(store), req(json_schema=SCHEMA)))
    llama.reset()
    asyncio.run(ask(client_for(store, use_cache=False), req(json_schema=SCHEMA)))
    assert forms(llama) == ["json_object"]


def test_json_object_refused_too_moves_to_text_parsed_strictly(llama, store):
    llama.refuse["response_format.json_object"] = (400, "response_format json_object is not supported")
    llama.responder = lambda r: "```json\n" + json.dumps({"explanation": "commas"}) + "\n```"
    out = asyncio.run(ask(client_for(store), req(json_schema=SCHEMA)))
    assert out == ["commas"]
    assert forms(llama) == ["json_schema", "json_object", None]
    assert "JSON schema" in llama.requests[-1].messages[0]["content"]


def test_text_form_refuses_words_around_the_json(llama, store):
    llama.responder = lambda r: 'Sure! {"explanation": "commas"}'
    client = client_for(store, structured="text", max_parse_retries=1)
    with pytest.raises(LLMCallFailed, match="parse"):
        asyncio.run(ask(client, req(json_schema=SCHEMA)))
    assert forms(llama) == [None, None]


def test_a_forced_form_the_server_refuses_fails_once_as_request_rejected(llama, store):
    with pytest.raises(RequestRejected, match="request rejected"):
        asyncio.run(ask(client_for(store, structured="json_schema"), req(json_schema=SCHEMA)))
    assert len(llama.requests) == 1
    assert [r["status"] for r in store.rows()] == ["error"]


def test_forced_json_object_is_sent_as_asked(fake_llm, store):
    asyncio.run(ask(client_for(store, structured="json_object"), req(json_schema=SCHEMA)))
    assert forms(fake_llm) == ["json_object"]


def test_refused_logprobs_switch_the_simulator_to_json(fake_llm, store):
    fake_llm.refuse["logprobs"] = (400, "logprobs is not supported by this server")

    def responder(r):
        if r.json_schema is not None:
            return json.dumps({"activations": [0, 10]})
        return Reply("a\t0\nb\t10", logprobs=simple_logprobs("a\t0\nb\t10", top=2))

    fake_llm.responder = responder
    client = client_for(store)
    simulator = llm_simulator(client)
    assert isinstance(simulator, LogprobSimulator)
    window = type("W", (), {"tokens": ["a", "b"]})()

    async def go():
        try:
            return await simulator.simulate_window("letters", window)
        finally:
            await client.aclose()

    out = asyncio.run(go())
    assert out == [0, 10] and isinstance(simulator._fallback, StructuredSimulator)
    assert client.supports_logprobs is False
    assert [r.logprobs_asked for r in fake_llm.requests] == [True, False, False]


def test_an_unknown_parameter_is_dropped(fake_llm, store, con):
    fake_llm.refuse["seed"] = (400, "Unrecognized request argument supplied: seed")
    out = asyncio.run(ask(client_for(store), req(json_schema=SCHEMA, seed=3)))
    assert out == ["ok"]
    assert ["seed" in r.body for r in fake_llm.requests] == [True, False]
    assert con.execute("SELECT dropped_params FROM llm_capabilities").fetchone()[0] == ["seed"]


@pytest.mark.parametrize("status, message, sent, expected", [
    (500, LLAMA_CPP_JSON_SCHEMA_ERROR, {"response_format": {}}, "response_format"),
    (422, "response_format: extra inputs are not permitted", {"response_format": {}}, "response_format"),
    (500, "CUDA out of memory", {"response_format": {}}, None),  # an outage, retried as one
    (400, "maximum context length exceeded", {"response_format": {}, "seed": 1}, None),
    (400, "logprobs is not supported", {"logprobs": True}, "logprobs"),
    (400, "Unrecognized request argument supplied: seed", {"seed": 1}, "seed"),
    (503, "seed server overloaded, unknown state", {"seed": 1}, None),
])
def test_what_counts_as_a_refusal(status, message, sent, expected):
    assert refused_feature(status, message, sent) == expected


def test_label_through_a_llama_cpp_like_server_uses_every_answer(labdb, llama, capsys):
    """`label` with an LLM explainer, simulator and every scorer at a server that refuses
    json_schema: refusals are re-sent at once as json_object, no feature fails, and the next run
    starts with json_object."""
    from tests.test_label import _label, _q, _reader

    llama.responder = _reader
    spec = "openai:smollm2"
    assert _label(labdb, "--features", "2:4", "--explainer", spec, "--simulator", spec,
                  "--scorers", "simulation,detection,fuzzing") == 0
    out = capsys.readouterr().out
    assert re.search(r"failed\s+0", out), out
    assert _q(labdb, "SELECT count(*) FROM scores") == [(6,)]
    errors = _q(labdb, "SELECT DISTINCT left(error, 17) FROM llm_calls WHERE status = 'error'")
    assert errors == [("request rejected ",)]
    assert _q(labdb, "SELECT structured FROM llm_capabilities") == [("json_object",)]
    llama.reset()
    assert _label(labdb, "--features", "2:4", "--explainer", spec, "--simulator", spec,
                  "--scorers", "detection", "--redo", "--no-cache") == 0
    assert "json_schema" not in forms(llama) and all(r.status == 200 for r in llama.requests)


def test_label_structured_option(labdb, capsys):
    from featurescribe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["label", "--db", labdb, "--source", "x", "--structured", "yaml"])
    assert exc.value.code == 2
    assert "--structured" in capsys.readouterr().err


@pytest.mark.parametrize("status", [200, 404])
def test_a_base_url_that_is_no_api_is_one_line_and_exit_2(labdb, fake_llm, capsys, status):
    from tests.test_label import _cli

    fake_llm.html_status = status
    assert _cli(labdb, "--features", "2:4", "--explainer", "openai:smollm2") == 2
    # (Prefect logs the failed task run on stderr too; the command's own line is the last)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("featurescribe: error:")]
    assert len(err) == 1, err
    assert err[0].startswith(f"featurescribe: error: {fake_llm.base_url_openai} is not an OpenAI-compatible API")
    assert f"HTTP {status} (text/html)" in err[0] and "Welcome" in err[0]
    assert len(fake_llm.requests) <= 2  # not retried as an outage


def test_an_api_404_is_a_failed_call_not_a_wrong_url(fake_llm, store):
    fake_llm.refuse["model"] = (404, "The model `smollm2` does not exist.")
    with pytest.raises(LLMCallFailed, match="HTTP 404: The model `smollm2` does not exist"):
        asyncio.run(ask(client_for(store), req(json_schema=SCHEMA)))
    assert len(fake_llm.requests) == 1


def test_timeout_and_concurrency_per_backend_kind(monkeypatch):
    from featurescribe.errors import FeaturescribeError
    from featurescribe.llm.client import ClientSettings

    monkeypatch.setenv("FEATURESCRIBE_LLM_TIMEOUT", "60")
    monkeypatch.setenv("FEATURESCRIBE_LLM_TIMEOUT_OPENAI", "900")
    monkeypatch.setenv("FEATURESCRIBE_LLM_CONCURRENCY_OPENAI", "2")
    assert ClientSettings.from_env("openai", concurrency=16).timeout_s == 900
    assert ClientSettings.from_env("openai", concurrency=16).concurrency == 2  # a cap on --concurrency
    assert ClientSettings.from_env("anthropic", concurrency=16).timeout_s == 60
    assert ClientSettings.from_env("openai", timeout_s=5).timeout_s == 5  # --timeout wins
    monkeypatch.setenv("FEATURESCRIBE_LLM_TIMEOUT_OPENAI", "soon")
    with pytest.raises(FeaturescribeError, match="FEATURESCRIBE_LLM_TIMEOUT_OPENAI='soon' is not a valid float"):
        ClientSettings.from_env("openai")


def test_parse_retries_may_be_zero(monkeypatch):
    from featurescribe.errors import FeaturescribeError
    from featurescribe.llm.client import ClientSettings

    monkeypatch.setenv("FEATURESCRIBE_LLM_PARSE_RETRIES_OPENAI", "0")
    assert ClientSettings.from_env("openai").max_parse_retries == 0
    monkeypatch.setenv("FEATURESCRIBE_LLM_PARSE_RETRIES_OPENAI", "-1")
    with pytest.raises(FeaturescribeError, match="PARSE_RETRIES_OPENAI must be 0 or more"):
        ClientSettings.from_env("openai")
    monkeypatch.setenv("FEATURESCRIBE_LLM_TIMEOUT", "0")
    with pytest.raises(FeaturescribeError, match="TIMEOUT must be more than 0"):
        ClientSettings.from_env("anthropic")


def test_label_timeout_is_reported_as_a_timeout(labdb, fake_llm, capsys, monkeypatch):
    from tests.test_label import _label, _q

    fake_llm.responder = lambda r: json.dumps({"explanation": "commas"})
    fake_llm.inject("slow", times=8, delay_s=1.5)
    monkeypatch.setenv("FEATURESCRIBE_LLM_TIMEOUT", "30")  # --timeout wins over it
    assert _label(labdb, "--features", "2:3", "--explainer", "openai:smollm2", "--timeout", "0.3") == 0
    assert re.search(r"failed\s+1", capsys.readouterr().out)
    (error,) = _q(labdb, "SELECT error FROM explanations")[0]
    assert "transport failure" in error and "timeout after 0.3 s" in error and "parse" not in error
