"""Bulk writes: rows go in as Arrow tables or numpy columns, never row by row."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

# The name under which DuckDB's replacement scan finds the table (the local variable of that name in
# insert_arrow); odd enough that no real table shadows it.
_SCAN_NAME = "__featurescribe_bulk_arrow__"


def insert_arrow(con, table: str, data: pa.Table | Mapping[str, Sequence], *,
                 consts: Mapping[str, Any] | None = None) -> int:
    """Insert an Arrow table (or a dict of equal-length columns) into `table` by column name.

    `consts`: columns that hold one value for every row (e.g. a source id), sent as SQL parameters
    instead of as a column of n copies, which DuckDB would otherwise read, hash and compress per row.

    The insert runs on `con` itself, so it belongs to the caller's open transaction. The table is
    read by DuckDB's replacement scan of a local variable rather than `con.register`, which DuckDB 2.0
    refuses while the connection still has a partly fetched result.

    `activations` is a view: its rows go to the int-keyed table under it (store/activation_store.py).
    """
    if table == "activations":
        from featurescribe.store.activation_store import insert_activations

        return insert_activations(con, data, consts=consts)
    tbl = data if isinstance(data, pa.Table) else pa.table(dict(data))
    if tbl.num_rows == 0:
        return 0
    consts = dict(consts or {})
    names = [f'"{c}"' for c in tbl.column_names] + [f'"{c}"' for c in consts]
    select = [f'"{c}"' for c in tbl.column_names] + ["?" for _ in consts]
    sql = f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(select)} FROM {_SCAN_NAME}"
    params = list(consts.values())
    __featurescribe_bulk_arrow__ = tbl  # noqa: F841 - the frame local the replacement scan finds
    try:
        con.execute(sql, params)
    except Exception as err:  # replacement scans switched off (SET python_enable_replacements = false)
        if _SCAN_NAME not in str(err):
            raise
        con.register(_SCAN_NAME, tbl)
        try:
            con.execute(sql, params)
        finally:
            con.unregister(_SCAN_NAME)
    return tbl.num_rows
