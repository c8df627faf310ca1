"""Bulk writes: rows go in as Arrow tables or numpy columns, never row by row."""

from __future__ import annotations

import uuid
from typing import Mapping, Sequence

import pyarrow as pa


def insert_arrow(con, table: str, data: pa.Table | Mapping[str, Sequence]) -> int:
    """Insert an Arrow table (or a dict of equal-length columns) into `table` by column name."""
    tbl = data if isinstance(data, pa.Table) else pa.table(dict(data))
    if tbl.num_rows == 0:
        return 0
    view = f"_bulk_{uuid.uuid4().hex}"
    con.register(view, tbl)
    try:
        cols = ", ".join(f'"{c}"' for c in tbl.column_names)
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {view}")
    finally:
        con.unregister(view)
    return tbl.num_rows
