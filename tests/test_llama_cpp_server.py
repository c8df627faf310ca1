"""`featurescribe label` through a REAL OpenAI-compatible server: llama.cpp's, from the
`llama-cpp-python[server]` package, serving the packaged SmolLM2-135M GGUF on 127.0.0.1, with an
LLM explainer and simulator and every scorer, on a real harvest of the same model.

What it shows: no request is left rejected by the server (its refusal of `json_schema` is
negotiated to `json_object` and each refused call is sent again), every answer is either used or
recorded as the model's own failure, and the run's summary (`runs.call_outcomes` and the printed
lines) tells the two apart. Kept small (one feature, four windows of 8 tokens to explain, two to
test on, two steering prompts, no second asking after an unusable answer): llama-cpp-python
answers one request at a time, and one with `top_logprobs` costs seconds on a CPU.
"""

from __future__ import annotations

import json
import re

import pytest

from featurescribe.cli import main
from featurescribe.scorers.registry import SCORERS
from tests.dbq import q
from tests.llama_cpp_server import LlamaCppServer, require_llama_cpp

pytestmark = pytest.mark.slow

SOURCE = "3-mlp"
SPEC = "openai:smollm2"
WINDOWS = ("explain.top=4,explain.quantile=0,valid.top=0,valid.random=0,"
           "test.top=2,test.quantile=0,test.random=2")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    require_llama_cpp()
    from featurescribe.harvest.models import BUILTIN_MODELS

    work = tmp_path_factory.mktemp("llama")
    with LlamaCppServer(BUILTIN_MODELS["smollm2-135m"].gguf(work), work / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("llama-db") / "h.duckdb")
    assert main(["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "3", "--max-tokens", "2048",
                 "--device", "cpu", "--no-progress"]) == 0
    return db


def _busiest(db: str, n: int) -> list[int]:
    """The n alive features with the most activations."""
    rows = q(db, "SELECT feature_id FROM features WHERE source_id = ? AND coalesce(status, 'alive') = 'alive' "
                 "ORDER BY n_active DESC, feature_id LIMIT ?", [SOURCE, n])
    return [r[0] for r in rows]


def test_label_through_llama_cpp_with_every_scorer(harvested, llama_server, monkeypatch, capsys,
                                                   prefect_server, fresh_limiters):
    monkeypatch.setenv("OPENAI_BASE_URL", llama_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    # an unusable answer is not asked again: the small model seldom does better the second time,
    # and every answer is still used or recorded
    monkeypatch.setenv("FEATURESCRIBE_LLM_PARSE_RETRIES", "0")
    (feature,) = _busiest(harvested, 1)
    # the server answers one request at a time: two in flight keep it busy without queueing
    # requests into their timeouts
    assert main(["label", "--db", harvested, "--source", SOURCE, "--features", str(feature), "--no-progress",
                 "--explainer", SPEC, "--simulator", SPEC, "--scorers", ",".join(SCORERS.names()),
                 "--concurrency", "2", "--timeout", "300", "--window", "8", "--windows", WINDOWS,
                 "--explain-windows", "4", "--intervention-prompts", "2"]) == 0
    out = capsys.readouterr().out
    ((run_id, outcomes),) = q(harvested, "SELECT run_id, call_outcomes FROM runs WHERE flow = 'label'")
    outcomes = json.loads(outcomes)
    print(out, json.dumps(outcomes, indent=1), llama_server.log_tail(1500), sep="\n")  # shown on failure

    # the server refused nothing for good: only json_schema, each refused call sent again
    assert set(outcomes["server_refusal"]) <= {"request_rejected_resent"}, outcomes
    refused = q(harvested, "SELECT error FROM llm_calls WHERE run_id = ? AND status = 'error'", [run_id])
    assert refused and all("response_format" in e and "json_schema" in e for (e,) in refused), refused
    assert outcomes["transport"] == {} and outcomes["other"] == {} and outcomes["not_sent"] == {}
    assert q(harvested, "SELECT structured, logprobs FROM llm_capabilities") == [("json_object", True)]

    # every answer was used or is the model's own failure, and the summary says which
    by_status = dict(q(harvested, "SELECT status, count(*) FROM llm_calls WHERE run_id = ? GROUP BY 1", [run_id]))
    assert set(by_status) <= {"ok", "cached", "parse_error", "error"}, by_status
    assert sum(outcomes["model_failure"].values()) == by_status.get("parse_error", 0)
    assert sum(outcomes["used"].values()) == by_status["ok"] + by_status.get("cached", 0) > 0
    for group, title in (("used", "answers used"), ("model_failure", "model failures"),
                         ("server_refusal", "server refusals")):
        assert re.search(rf"^  {title} +{sum(outcomes[group].values())}\b", out, re.M), (group, out)

    # what failed failed on the model's answers (or on the windows), never on the server
    for line in re.findall(r"^failed feature \d+: (.*)$", out, re.M):
        assert not re.search(r"rejected|HTTP|timeout|connection", line), line
    # with an explanation, every LLM scorer asked the server
    if q(harvested, "SELECT count(*) FROM explanations WHERE run_id = ? AND status = 'ok'", [run_id])[0][0]:
        purposes = {p for (p,) in q(harvested, "SELECT DISTINCT purpose FROM llm_calls WHERE run_id = ? "
                                               "AND backend = 'openai'", [run_id])}
        assert purposes >= {"explain", "simulate", "detect", "fuzz", "intervention"}, purposes
