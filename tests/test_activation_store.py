"""`activations` as a view over int-keyed rows (issue 15): same columns and types, old databases move
their rows over, writes of every shape land under the view."""

from __future__ import annotations

import duckdb
import numpy as np

from featurescribe.store import open_db
from featurescribe.store.activation_store import insert_activations_query, source_keys
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.harvest_rows import delete_source
from featurescribe.store.schema import MIGRATIONS, VERSION_TABLE, current_version, SCHEMA_VERSION

CONTRACT_TYPES = [("source_id", "VARCHAR"), ("feature_id", "INTEGER"), ("seq_id", "BIGINT"), ("pos", "INTEGER"),
                  ("act", "FLOAT")]


def _view_types(con) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute("DESCRIBE activations").fetchall()]


def test_a_version_8_database_moves_its_rows_under_the_view_in_order(tmp_path):
    db = str(tmp_path / "old.duckdb")
    con = duckdb.connect(db)
    con.execute(VERSION_TABLE)
    for v in range(8):
        for stmt in MIGRATIONS[v]:
            con.execute(stmt)
        con.execute("INSERT INTO schema_version (version) VALUES (?)", [v + 1])
    rng = np.random.default_rng(0)
    rows = [(["b-sae", "a-mlp", "c-resid"][i % 3], int(rng.integers(0, 50)), i // 7, i % 7, float(i) / 4)
            for i in range(2000)]
    con.executemany("INSERT INTO activations VALUES (?, ?, ?, ?, ?)", rows)
    con.close()

    con = open_db(db)
    assert current_version(con) == SCHEMA_VERSION
    assert _view_types(con) == CONTRACT_TYPES
    got = con.execute("""SELECT k.source_id, a.feature_id, a.seq_id, a.pos, a.act
                         FROM activation_rows a JOIN source_keys k USING (source_key) ORDER BY a.rowid""").fetchall()
    assert got == rows  # every row, in the order it was written (a clustered source stays clustered)
    assert con.execute("SELECT count(*) FROM activations WHERE source_id = 'a-mlp'").fetchone()[0] == 667
    con.close()


def test_rows_of_several_sources_keep_their_ids_and_keys(tmp_path):
    con = open_db(str(tmp_path / "k.duckdb"))
    assert _view_types(con) == CONTRACT_TYPES
    n = 3000
    ids = np.array(["6-mlp", "6-res-sae4k", "0-mlp"])[np.arange(n) % 3]
    insert_arrow(con, "activations", {"source_id": ids, "feature_id": np.arange(n, dtype=np.int32),
                                      "seq_id": np.arange(n, dtype=np.int64), "pos": np.ones(n, np.int32),
                                      "act": np.full(n, 0.5, np.float32)})
    keys = source_keys(con, ["0-mlp", "6-mlp", "6-res-sae4k", "9-new"])
    assert sorted(keys.values()) == [0, 1, 2, 3] and keys["9-new"] == 3  # a new id takes the next key
    assert source_keys(con, ["6-mlp"]) == {"6-mlp": keys["6-mlp"]}  # stable
    insert_activations_query(con, "9-new", "SELECT range::INTEGER, 7, 1, 2.5 FROM range(5)")
    counts = dict(con.execute("SELECT source_id, count(*) FROM activations GROUP BY 1").fetchall())
    assert counts == {"6-mlp": 1000, "6-res-sae4k": 1000, "0-mlp": 1000, "9-new": 5}
    assert con.execute("SELECT feature_id % 3, count(DISTINCT source_id) FROM activations "
                       "WHERE source_id <> '9-new' GROUP BY 1 ORDER BY 1").fetchall() == [(0, 1), (1, 1), (2, 1)]

    delete_source(con, "6-mlp")
    counts = dict(con.execute("SELECT source_id, count(*) FROM activations GROUP BY 1").fetchall())
    assert counts == {"6-res-sae4k": 1000, "0-mlp": 1000, "9-new": 5}
    assert source_keys(con, ["6-mlp"]) == {"6-mlp": keys["6-mlp"]}  # the key is kept: never reused
    con.close()
