"""SQL of label embeddings: the `label_embeddings` table, what is missing, search.

One row per (explanation, embedder): the explanation's text embedded as a unit-length
`FLOAT[]` vector, with its feature's `source_id` and `feature_id` copied in so a search ranks
the vectors without a join. Cosine similarity is `list_inner_product(vec, query)` because every
stored vector and query has norm 1. From SQL, with a query vector from any embedder:

    SELECT l.source_id, l.feature_id, l.explanation,
           list_inner_product(x.vec, $query::FLOAT[]) AS similarity
    FROM label_embeddings x JOIN labels l USING (explanation_id)
    WHERE x.embedder = 'local:all-minilm-l6-v2'
    ORDER BY similarity DESC LIMIT 10

`semantic/search.py` ranks from a file copy of the vectors when the database has many
(semantic/vector_index.py); `fingerprint` tells it when that copy is stale.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from featurescribe.store.bulk import insert_arrow

MIGRATION = [
    """
    CREATE TABLE IF NOT EXISTS label_embeddings (
        explanation_id VARCHAR NOT NULL,
        embedder    VARCHAR NOT NULL,
        source_id   VARCHAR NOT NULL,
        feature_id  INTEGER NOT NULL,
        dim         INTEGER NOT NULL,
        vec         FLOAT[] NOT NULL,
        created_at  TIMESTAMP
    )
    """,
]

_MISSING = """
    SELECT e.explanation_id, e.source_id, e.feature_id, e.text
    FROM explanations e
    WHERE coalesce(e.status, 'ok') = 'ok' AND length(trim(e.text)) > 0
      AND ($source IS NULL OR e.source_id = $source)
      AND ($lo IS NULL OR e.feature_id BETWEEN $lo AND $hi)
      AND NOT EXISTS (SELECT 1 FROM label_embeddings x
                      WHERE x.explanation_id = e.explanation_id AND x.embedder = $embedder
                        AND ($lo IS NULL OR x.feature_id BETWEEN $lo AND $hi))
    ORDER BY e.source_id, e.feature_id, e.explanation_id"""


@dataclass
class PendingText:
    explanation_id: str
    source_id: str
    feature_id: int
    text: str


def _missing_params(embedder: str, source_id: str | None, feature_range: tuple[int, int] | None) -> dict:
    lo, hi = feature_range or (None, None)
    return {"embedder": embedder, "source": source_id, "lo": lo, "hi": hi}


def missing_texts(con, embedder: str, source_id: str | None = None,
                  feature_range: tuple[int, int] | None = None) -> pa.Table:
    """Every explanation without an embedding by `embedder` (explanation_id, source_id, feature_id,
    text), in order, read at once: the caller embeds them with the database closed. `feature_range`
    (first, last): only those features' (a label chunk's: the search does not grow with the file)."""
    cur = con.cursor()  # a relation's result stays open on its connection: this one is closed here
    try:
        return cur.sql(_MISSING, params=_missing_params(embedder, source_id, feature_range)).to_arrow_table()
    finally:
        cur.close()


def pending_texts(table: pa.Table) -> list[PendingText]:
    """Rows of `missing_texts` as PendingText."""
    return [PendingText(r["explanation_id"], r["source_id"], r["feature_id"], r["text"]) for r in table.to_pylist()]


def count_embedded(con, embedder: str, source_id: str | None = None) -> int:
    return int(con.execute(
        "SELECT count(*) FROM label_embeddings WHERE embedder = ? AND (? IS NULL OR source_id = ?)",
        [embedder, source_id, source_id]).fetchone()[0])


def write_embeddings(con, embedder: str, items: Sequence[PendingText], vectors: np.ndarray) -> int:
    """Insert one batch of vectors (rows of `vectors` match `items`), but not for explanations that
    got one from this embedder since they were read (another embed run, a label run's chunk)."""
    have = {r[0] for r in con.execute(  # the batch's features only: DuckDB skips the row groups of others
        "SELECT explanation_id FROM label_embeddings WHERE embedder = ? AND feature_id BETWEEN ? AND ? "
        "AND list_contains(?, explanation_id)",
        [embedder, min(i.feature_id for i in items), max(i.feature_id for i in items),
         [i.explanation_id for i in items]]).fetchall()} if len(items) else set()
    keep = [k for k, i in enumerate(items) if i.explanation_id not in have]
    items, vectors = [items[k] for k in keep], np.asarray(vectors)[keep]
    if not len(items):
        return 0
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    flat = pa.array(vectors.reshape(-1), pa.float32())
    vec = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), flat)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    table = pa.table({
        "explanation_id": pa.array([i.explanation_id for i in items], pa.string()),
        "source_id": pa.array([i.source_id for i in items], pa.string()),
        "feature_id": pa.array([i.feature_id for i in items], pa.int32()),
        "vec": vec,
    })
    return insert_arrow(con, "label_embeddings", table,
                        consts={"embedder": embedder, "dim": d, "created_at": now})


def embedders_present(con) -> list[tuple[str, int]]:
    """(embedder, number of vectors) in the database, most vectors first."""
    return [(r[0], int(r[1])) for r in con.execute(
        "SELECT embedder, count(*) FROM label_embeddings GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()]


def nearest_explanations(con, embedder: str, query: np.ndarray, n: int,
                         source_id: str | None = None) -> list[dict]:
    """The `n` explanations whose vectors are closest to `query` (any explanation, best or not)."""
    rows = con.execute(
        """SELECT explanation_id, source_id, feature_id, list_inner_product(vec, $q::FLOAT[]) AS similarity
           FROM label_embeddings
           WHERE embedder = $embedder AND ($source IS NULL OR source_id = $source)
           ORDER BY similarity DESC, explanation_id LIMIT $n""",
        {"q": [float(x) for x in query], "embedder": embedder, "source": source_id, "n": int(n)},
    ).fetchall()
    return [{"explanation_id": r[0], "source_id": r[1], "feature_id": r[2], "similarity": float(r[3])}
            for r in rows]


def best_labels_of(con, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """The `labels` row (with density) of each (source_id, feature_id) in `keys` that has one."""
    out: dict[tuple[str, int], dict] = {}
    by_source: dict[str, list[int]] = {}
    for s, f in keys:
        by_source.setdefault(s, []).append(int(f))
    for source, ids in by_source.items():
        cur = con.execute(
            """SELECT l.source_id, l.feature_id, l.explanation_id, l.explanation, l.score, l.scorer,
                      l.lift, l.explainer, f.frac_active, f.n_active
               FROM labels l LEFT JOIN features f USING (source_id, feature_id)
               WHERE l.source_id = $source AND list_contains($ids, l.feature_id)""",
            {"source": source, "ids": sorted(set(ids))})
        cols = [c[0] for c in cur.description]
        for r in cur.fetchall():
            row = dict(zip(cols, r))
            out[(row["source_id"], row["feature_id"])] = row
    return out


def vector_of(con, explanation_id: str, embedder: str) -> np.ndarray | None:
    row = con.execute("SELECT vec FROM label_embeddings WHERE explanation_id = ? AND embedder = ? LIMIT 1",
                      [explanation_id, embedder]).fetchone()
    return None if row is None else np.asarray(row[0], dtype=np.float32)


def fingerprint(con, embedder: str) -> list:
    """What changes whenever `embedder`'s vectors are added or removed: rows are only inserted,
    each batch with a fresh `created_at`, or deleted. A file copy of them (the vector index) is
    fresh while this is unchanged; a vector edited in place by hand is not noticed."""
    row = con.execute(
        """SELECT count(*), max(created_at)::VARCHAR, min(created_at)::VARCHAR
           FROM label_embeddings WHERE embedder = ?""", [embedder]).fetchone()
    return [int(row[0]), row[1], row[2]]


def iter_vectors(con, embedder: str, batch: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Every vector of `embedder` with its keys, as Arrow batches (`explanation_id`, `source_id`,
    `feature_id`, `vec`), in no particular order, read through a cursor in `con`'s catalog."""
    catalog = con.execute("SELECT current_database()").fetchall()[0][0]
    cur = con.cursor()
    try:
        cur.execute(f'USE "{catalog}"')
        yield from cur.sql("SELECT explanation_id, source_id, feature_id, vec FROM label_embeddings "
                           "WHERE embedder = $embedder", params={"embedder": embedder}).to_arrow_reader(batch)
    finally:
        cur.close()


def database_path(con) -> str | None:
    """The file behind the connection's current catalog (None for an in-memory database)."""
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return row[0] if row and row[0] else None
