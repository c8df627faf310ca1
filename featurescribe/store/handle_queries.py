"""Reads of the Python API's database handle (`featurescribe.open(path)`): tables as Arrow, and
one feature with everything known about it. Each call gets a connection and gives it back."""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from featurescribe.errors import SQLFailed, UnknownFeature
from featurescribe.store import browse_queries as bq
from featurescribe.store.labelling import source_width
from featurescribe.store.sampling import arrow_table
from featurescribe.store.sql_errors import sql_error_line
from featurescribe.store.user_sql import API_READ_ONLY_HINT, run_script, unique_names
from featurescribe.store.windows import WindowCounts, feature_windows

_FEATURES_SQL = """
    SELECT f.source_id, f.feature_id, f.n_active, f.frac_active, f.max_act, f.mean_act, f.status,
           l.explanation, l.score, l.scorer, l.lift, l.explainer, l.simulator
    FROM features f LEFT JOIN labels l USING (source_id, feature_id)
    WHERE f.source_id = $source ORDER BY f.feature_id"""


def query_table(con, sql: str, params: dict | None = None) -> pa.Table:
    """The result of one statement as an Arrow table (empty for a statement without rows);
    SQLFailed with DuckDB's first line for SQL it refuses."""
    cur = con.cursor()  # a fresh cursor: the connection may hold an unfinished result
    try:
        rel = cur.sql(sql, params=params)
        return pa.table({}) if rel is None else arrow_table(rel)
    except duckdb.Error as err:
        raise SQLFailed(sql_error_line(err, sql)) from None
    finally:
        cur.close()


def user_table(con, query: str, write: bool) -> pa.Table:
    """A user's SQL script (store/user_sql.py) and its last statement's result as an Arrow table
    (empty for a statement without rows)."""
    cur = con.cursor()  # a fresh cursor: the connection may hold an unfinished result
    try:
        return run_script(cur, query, _last_table, write=write, read_only_hint=API_READ_ONLY_HINT)
    finally:
        cur.close()


def _last_table(con, query: str) -> pa.Table:
    rel = con.sql(query)
    if rel is None:
        return pa.table({})
    table = arrow_table(rel)
    return table.rename_columns(unique_names(table.column_names))


def sources_table(con) -> pa.Table:
    return query_table(con, "SELECT source_id, model_id, hook_name, layer, site, kind, width, n_tokens, sae_path "
                            "FROM sources ORDER BY source_id")


def labels_table(con, source_id: str | None = None) -> pa.Table:
    """The `labels` view (the best-scored explanation per feature), one source or all."""
    if source_id is None:
        return query_table(con, "SELECT * FROM labels ORDER BY source_id, feature_id")
    source_width(con, source_id)
    return query_table(con, "SELECT * FROM labels WHERE source_id = $source ORDER BY feature_id",
                       {"source": source_id})


def features_table(con, source_id: str) -> pa.Table:
    """Every feature of a source with its statistics and best label (NULL when unlabelled)."""
    source_width(con, source_id)
    return query_table(con, _FEATURES_SQL, {"source": source_id})


def feature_detail(con, source_id: str, feature_id: int, n_windows: int) -> dict[str, Any]:
    """Stats, explanations with every score and baseline, histogram, and windows (those a label
    run sampled, else read from `activations`) of one feature; UnknownFeature when it has none."""
    width = source_width(con, source_id)
    stats = bq.feature_stats(con, source_id, feature_id)
    if stats is None:
        raise UnknownFeature(f"source {source_id!r} has no feature {feature_id} (it has 0:{width})")
    windows = bq.sampled_windows(con, source_id, feature_id)
    if not windows:
        windows = feature_windows(con, source_id, feature_id, WindowCounts(top=n_windows, random=max(2, n_windows // 2)))
    return {"source_id": source_id, "feature_id": int(feature_id), "stats": stats,
            "explanations": bq.feature_explanations(con, source_id, feature_id, best_from="labels"),
            "histogram": bq.feature_histogram(con, source_id, feature_id), "examples": windows}
