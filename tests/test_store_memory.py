"""The memory bound of a long run's openings (store/memory.py): DuckDB cannot evict primary-key
indexes, so the bound sits above what they take. Each test first shows that a fixed bound of the
same size fails on the same work: the workload is big enough to matter."""

import duckdb
import pytest

from featurescribe.store import open_db
from featurescribe.store.connection import Database
from featurescribe.store.harvest_rows import finalize_sources
from featurescribe.store.memory import lean_checkpoint, limit_memory

HEADROOM_MB = 16
NEW_CACHE_ROWS = ("INSERT INTO llm_cache (cache_key, backend, model, response) "
                  "SELECT sha256(random()::VARCHAR), 'openai', 'm', '{}' FROM range(1000)")


# DuckDB raises it at the statement, or at the commit (then as a TransactionException)
OUT_OF_MEMORY = dict(expected_exception=(duckdb.OutOfMemoryException, duckdb.TransactionException),
                     match="allocate")


def fixed_limit(path):
    con = duckdb.connect(path)
    con.execute(f"SET memory_limit = '{HEADROOM_MB}MB'")
    return con


@pytest.fixture
def big_ledger(tmp_path):
    path = str(tmp_path / "ledger.duckdb")
    con = open_db(path)
    con.execute("INSERT INTO llm_cache (cache_key, backend, model, response) "
                "SELECT sha256(i::VARCHAR), 'openai', 'm', '{}' FROM range(300000) r(i)")
    con.close()
    return path


def test_a_run_opening_writes_to_a_key_index_bigger_than_its_headroom(big_ledger):
    con = fixed_limit(big_ledger)
    with pytest.raises(**OUT_OF_MEMORY):
        con.execute(NEW_CACHE_ROWS)
    con.close()

    with Database(big_ledger, memory_headroom_mb=HEADROOM_MB).connect() as con:
        con.execute(NEW_CACHE_ROWS)
        assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 301_000


def test_the_limit_grows_with_the_keys_and_the_keys_to_come(big_ledger):
    con = duckdb.connect(big_ledger)
    try:
        limit_memory(con, HEADROOM_MB)
        with_keys = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        limit_memory(con, HEADROOM_MB, new_keys=1_000_000)
        with_more = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    finally:
        con.close()
    mib = lambda s: float(s.split()[0])  # noqa: E731 - '49.5 MiB'
    assert HEADROOM_MB + 30 < mib(with_keys) < mib(with_more) - 100


def test_finalize_writes_a_million_feature_rows_under_a_small_headroom(tmp_path):
    path = str(tmp_path / "h.duckdb")
    open_db(path).close()
    con = fixed_limit(path)
    with pytest.raises(**OUT_OF_MEMORY):
        con.execute("INSERT INTO features (source_id, feature_id, n_active, frac_active) "
                    "SELECT 'x', i::INTEGER, 0, 0 FROM range(1200000) r(i)")
    con.close()

    with Database(path, memory_headroom_mb=HEADROOM_MB).connect() as con:
        counts = finalize_sources(con, [("s-a", 600_000, {}), ("s-b", 600_000, {})], 1)
        assert counts == [(0, 0, 0, 0), (0, 0, 0, 0)]
        assert con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'dead') FROM features").fetchone() \
            == (1_200_000, 1_200_000)


def _wal_bytes(path) -> int:
    wal = f"{path}.wal"
    import os

    return os.path.getsize(wal) if os.path.exists(wal) else 0


def _setting_mib(con) -> float:
    return float(con.execute("SELECT current_setting('memory_limit')").fetchone()[0].split()[0])


@pytest.fixture
def vectors(tmp_path):
    """A file whose last row group is large (label vectors): appending to it makes the checkpoint
    rewrite that row group."""
    path = str(tmp_path / "v.duckdb")
    con = open_db(path)
    con.execute("CREATE TABLE v (id INTEGER, vec FLOAT[])")
    con.execute("INSERT INTO v SELECT i, list_transform(range(384), lambda x: random()::FLOAT) FROM range(60000) r(i)")
    con.close()
    return path


def test_a_run_opening_checkpoints_under_the_tight_bound_before_closing(vectors):
    con = duckdb.connect(vectors)
    try:
        limit_memory(con, 128)
        con.execute("INSERT INTO v SELECT id, vec FROM v LIMIT 256")
        assert _wal_bytes(vectors) > 0
        lean_checkpoint(con, 128)
        assert _wal_bytes(vectors) == 0  # the closing has nothing left to write
        assert _setting_mib(con) < 128  # the checkpoint ran under the tight bound, which held
    finally:
        con.close()
    with Database(vectors, memory_headroom_mb=128).connect() as con:
        con.execute("INSERT INTO v SELECT id, vec FROM v LIMIT 256")
    assert _wal_bytes(vectors) == 0
    assert duckdb.connect(vectors).execute("SELECT count(*) FROM v").fetchone()[0] == 60512


def test_a_lean_checkpoint_that_runs_out_loses_nothing(vectors, monkeypatch):
    monkeypatch.setattr("featurescribe.store.memory.CHECKPOINT_HEADROOM_MB", 1)  # this file needs ~2 MB
    with Database(vectors, memory_headroom_mb=128).connect() as con:
        con.execute("INSERT INTO v SELECT id, vec FROM v LIMIT 256")
    assert _wal_bytes(vectors) > 0  # the checkpoint failed (fatally: DuckDB invalidated that instance)
    monkeypatch.undo()
    with Database(vectors, memory_headroom_mb=128).connect() as con:  # replays the log
        assert con.execute("SELECT count(*) FROM v").fetchone()[0] == 60256
    assert _wal_bytes(vectors) == 0
