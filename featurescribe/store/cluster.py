"""Store a source's activations in feature order, so reads of one feature skip the rest.

A harvest writes activations sequence by sequence: every row group holds every feature, and a
query for one feature (the browser's feature page, sampling a chunk of features) scans the whole
table. Rewritten in (feature_id, seq_id, pos) order, DuckDB's per-row-group min/max of
`feature_id` lets such a query read only the row groups that hold the feature. One transaction:
the rows are the same before and after, only their order changes.
"""

from __future__ import annotations

from featurescribe.store.activation_store import ROWS_TABLE, source_key


def is_clustered(con, source_id: str) -> bool:
    """Whether the source's rows are already in feature order (a harvest that ran again appends)."""
    row = con.execute(f"""
        SELECT count(*) FILTER (WHERE feature_id < prev)
        FROM (SELECT feature_id, lag(feature_id) OVER (ORDER BY rowid) AS prev
              FROM {ROWS_TABLE} WHERE source_key = ?)""", [source_key(con, source_id)]).fetchone()
    return int(row[0] or 0) == 0


def cluster_activations(con, source_id: str) -> int:
    """Rewrite `source_id`'s activations in feature order; returns the number of rows."""
    key = source_key(con, source_id)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"""CREATE TEMP TABLE _fs_cluster AS
                        SELECT * FROM {ROWS_TABLE} WHERE source_key = ? ORDER BY feature_id, seq_id, pos""", [key])
        con.execute(f"DELETE FROM {ROWS_TABLE} WHERE source_key = ?", [key])
        n = con.execute(f"INSERT INTO {ROWS_TABLE} SELECT * FROM _fs_cluster").fetchone()[0]
        con.execute("DROP TABLE _fs_cluster")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("CHECKPOINT")  # frees the row groups the old order left behind
    return int(n)
