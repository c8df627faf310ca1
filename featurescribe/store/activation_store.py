"""Where `activations` rows live: an int-keyed table under a view that reads as the contract says.

`activations` (source_id, feature_id, seq_id, pos, act) is a VIEW over `activation_rows`, which
stores a small integer `source_key` in place of the source_id string; `source_keys` maps one to
the other. DuckDB inserts rows with an integer key about twice as fast as rows that repeat a
VARCHAR (BENCHMARKS.md, issue 15), and a harvest writes tens of millions of them. Reads are
unchanged: a filter on `source_id` reaches the table's scan as a filter on `source_key` (DuckDB
pushes the join's key range down), so the per-row-group min/max still skips other sources.

Every write of activation rows goes through this module (or `insert_arrow(con, "activations", ...)`,
which comes here): a view cannot be inserted into.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROWS_TABLE = "activation_rows"
KEYS_TABLE = "source_keys"
VIEW = "activations"
STORAGE_TABLES = (ROWS_TABLE, KEYS_TABLE)  # internal: read through the view
ROW_COLUMNS = ("feature_id", "seq_id", "pos", "act")

_VIEW_SQL = f"""
    CREATE OR REPLACE VIEW {VIEW} AS
    SELECT k.source_id, a.feature_id, a.seq_id, a.pos, a.act
    FROM {ROWS_TABLE} a JOIN {KEYS_TABLE} k ON k.source_key = a.source_key
"""

# Schema version 9: the old `activations` table's rows move into activation_rows, in their order.
MIGRATION = [
    f"""
    CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (
        source_key  INTEGER PRIMARY KEY,
        source_id   VARCHAR NOT NULL UNIQUE
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {ROWS_TABLE} (
        source_key  INTEGER NOT NULL,
        feature_id  INTEGER NOT NULL,
        seq_id      BIGINT NOT NULL,
        pos         INTEGER NOT NULL,
        act         REAL NOT NULL
    )
    """,
    f"""
    INSERT INTO {KEYS_TABLE} (source_key, source_id)
    SELECT row_number() OVER (ORDER BY source_id) - 1, source_id FROM (SELECT DISTINCT source_id FROM {VIEW})
    """,
    f"""
    INSERT INTO {ROWS_TABLE} (source_key, feature_id, seq_id, pos, act)
    SELECT k.source_key, a.feature_id, a.seq_id, a.pos, a.act
    FROM {VIEW} a JOIN {KEYS_TABLE} k USING (source_id) ORDER BY a.rowid
    """,
    f"DROP TABLE {VIEW}",
    _VIEW_SQL,
]


def source_keys(con, source_ids: Sequence[str]) -> dict[str, int]:
    """The integer key of each source id, allocating keys for new ones (in the caller's transaction
    if one is open)."""
    wanted = list(dict.fromkeys(source_ids))
    if not wanted:
        return {}
    con.execute(f"""
        INSERT INTO {KEYS_TABLE} (source_key, source_id)
        SELECT (SELECT coalesce(max(source_key) + 1, 0) FROM {KEYS_TABLE}) + row_number() OVER (ORDER BY i) - 1, s
        FROM (SELECT unnest($ids) AS s, generate_subscripts($ids, 1) AS i)
        WHERE s NOT IN (SELECT source_id FROM {KEYS_TABLE})
    """, {"ids": wanted})
    rows = con.execute(f"SELECT source_id, source_key FROM {KEYS_TABLE} WHERE list_contains($ids, source_id)",
                       {"ids": wanted}).fetchall()
    return dict(rows)


def source_key(con, source_id: str) -> int | None:
    """The key of a source that has one (None: it never had activation rows)."""
    row = con.execute(f"SELECT source_key FROM {KEYS_TABLE} WHERE source_id = ?", [source_id]).fetchone()
    return None if row is None else int(row[0])


def insert_key_rows(con, rows: pa.Table) -> int:
    """Insert rows that already carry `source_key` (the harvest's writers)."""
    from featurescribe.store.bulk import insert_arrow

    return insert_arrow(con, ROWS_TABLE, rows)


def insert_activations(con, data: pa.Table | Mapping[str, Sequence], *,
                       consts: Mapping[str, Any] | None = None) -> int:
    """Insert rows shaped like the `activations` view (a `source_id` column, or one in `consts`)."""
    from featurescribe.store.bulk import insert_arrow

    tbl = data if isinstance(data, pa.Table) else pa.table(dict(data))
    consts = dict(consts or {})
    if tbl.num_rows == 0:
        return 0
    if "source_id" in consts:
        key = source_keys(con, [consts.pop("source_id")])
        return insert_arrow(con, ROWS_TABLE, tbl, consts=dict(consts, source_key=next(iter(key.values()))))
    if "source_id" not in tbl.column_names:
        raise ValueError("activation rows need a source_id (a column or a constant)")
    ids = pc.dictionary_encode(tbl.column("source_id")).combine_chunks()
    keys = source_keys(con, ids.dictionary.to_pylist())
    lookup = np.array([keys[s] for s in ids.dictionary.to_pylist()], dtype=np.int32)
    key_col = pa.array(lookup[ids.indices.to_numpy(zero_copy_only=False)])
    rows = tbl.drop_columns(["source_id"]).append_column("source_key", key_col)
    return insert_arrow(con, ROWS_TABLE, rows, consts=consts)


def delete_activations(con, source_id: str) -> None:
    """Drop a source's rows (its key stays allocated, so keys never change meaning)."""
    con.execute(f"DELETE FROM {ROWS_TABLE} WHERE source_key = (SELECT source_key FROM {KEYS_TABLE} "
                "WHERE source_id = ?)", [source_id])


def insert_activations_query(con, source_id: str, select_sql: str, params=None) -> int:
    """Insert one source's rows made by a query of (feature_id, seq_id, pos, act), in that order:
    for databases built in SQL (tests, benchmarks) without moving the rows through Python."""
    key = source_keys(con, [source_id])[source_id]
    cols = ", ".join(ROW_COLUMNS)
    n = con.execute(f"INSERT INTO {ROWS_TABLE} (source_key, {cols}) SELECT ?, * FROM ({select_sql})",
                    [key, *(params or [])]).fetchone()[0]
    return int(n)
