"""Reads of the `browse` web app: a filtered, sorted, paged feature list and one feature's page.

Sorting, filtering and paging run in DuckDB (one query a page, `LIMIT`/`OFFSET`), so a page costs
the same at a thousand features or a million. Nothing here writes: the app opens the database
read-only (`FileReader`), without even upgrading an older schema, and only while a request reads.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from featurescribe.errors import FeaturescribeError, SchemaTooNew
from featurescribe.store.connection import database_exists, not_featurescribe
from featurescribe.store.export_queries import HISTOGRAM_BINS
from featurescribe.store.schema import SCHEMA_VERSION, current_version
from featurescribe.store.windows import SEQUENCE_ORDER_SQL, SequenceTables, WindowCounts

SORTS = {  # name -> ORDER BY expression (ties: source, feature)
    "score": "score", "lift": "lift", "density": "frac_active", "max_act": "max_act",
    "feature": "feature_id", "n_active": "n_active",
}
STATUSES = ("labelled", "unlabelled", "alive", "dead", "rare")
MAX_OFFSET = 2**63 - 1  # DuckDB's OFFSET is a BIGINT


CATALOG = "fsdb"  # the database file, attached read-only
ROWS = "memory.main.browse_rows"  # every feature with its best label, built once at start


OLDEST_READABLE = 11  # the schema version of the newest column the pages read (scores.baseline_population)


def unreadable_version(path: str, version: int) -> FeaturescribeError:
    if version > SCHEMA_VERSION:
        return SchemaTooNew(f"database {path} has schema version {version}, newer than this featurescribe "
                            f"understands ({SCHEMA_VERSION}); upgrade featurescribe")
    if version == 0:
        return not_featurescribe(path)
    return FeaturescribeError(f"database {path} has schema version {version}, older than browse reads; browse "
                              f"only reads, so upgrade it once with: featurescribe init --db {path}")


class FileReader:
    """The database file as the browse app reads it: an in-memory DuckDB (which keeps `ROWS`) to
    which the file is attached read-only only while requests are reading it, so that between
    requests the file is free for a run that writes it. Nothing can be written to the file (an
    older schema is read as it is). `ROWS` is rebuilt when the file has changed since it was
    built (at most every `refresh_s` seconds), so labels that land while the app runs show up."""

    def __init__(self, path: str, refresh_s: float = 5.0):
        import threading

        import duckdb

        if not database_exists(path):
            raise FeaturescribeError(f"no database at {path}")
        self.path, self.refresh_s = path, refresh_s
        self.con = duckdb.connect()
        self._lock = threading.Lock()
        self._users = 0
        self._built: tuple | None = None  # (the file's stamp, when) of the last build of ROWS
        self.n_features = 0
        self.generation = 0
        try:
            with self.reading():  # the first build, and the schema version's check
                pass
        except BaseException:
            self.con.close()
            raise

    def _stamp(self) -> tuple:
        import os

        files = [self.path, self.path + ".wal"]
        return tuple((st.st_mtime_ns, st.st_size) for st in (os.stat(f) for f in files if os.path.exists(f)))

    def _attach(self) -> None:
        import time

        from featurescribe.store.connection import attach_read_only

        attach_read_only(self.con, self.path, CATALOG)
        stamp, now = self._stamp(), time.monotonic()
        if self._built is None or (stamp != self._built[0] and now - self._built[1] >= self.refresh_s):
            try:
                self._build()
            except BaseException:
                self.con.execute(f"DETACH {CATALOG}")
                raise
            self._built = (stamp, now)
            self.generation += 1  # the per-source sequence orders are to be made again

    def _build(self) -> None:
        cur = self.con.cursor()
        try:
            use_catalog(cur)
            version = current_version(cur)
            if not OLDEST_READABLE <= version <= SCHEMA_VERSION:
                raise unreadable_version(self.path, version)
            if has_table(cur, "features"):
                self.n_features = prepare_rows(cur)
                prepare_sequences(cur)
        finally:
            cur.close()

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A cursor reading the file (attached for as long as any request reads)."""
        with self._lock:
            if self._users == 0:
                self._attach()
            self._users += 1
        cur = self.con.cursor()
        try:
            use_catalog(cur)
            yield cur
        finally:
            cur.close()
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self.con.execute(f"DETACH {CATALOG}")

    def close(self) -> None:
        self.con.close()


def use_catalog(con) -> None:
    con.execute(f"USE {CATALOG}")
    con.execute("SET enable_progress_bar = false")


def prepare_rows(con) -> int:
    """Every feature joined with its best label, in memory: the list pages sort and filter this
    table (a million rows) instead of computing the `labels` view for every page."""
    con.execute(f"""CREATE OR REPLACE TABLE {ROWS} AS
                    SELECT f.source_id, f.feature_id, f.n_active, f.frac_active, f.max_act, f.status,
                           l.explanation, l.score, l.scorer, l.lift, l.explainer, l.explanation_id
                    FROM features f LEFT JOIN labels l USING (source_id, feature_id)""")
    return int(con.execute(f"SELECT count(*) FROM {ROWS}").fetchone()[0])


SEQ_LEN = "memory.main.browse_seq_len"  # every sequence's length, built once at start
SEQ_ORDER = "memory.main.browse_seq_order"  # each source's sequences in the windows' hashed order
WINDOW_TABLES = SequenceTables(
    lengths=f"SELECT seq_id, seq_len FROM {SEQ_LEN}",
    order=f"SELECT seq_id, seq_len, r, n_total FROM {SEQ_ORDER} WHERE source_id = $source")


def prepare_sequences(con) -> None:
    """What a feature page's windows would otherwise compute from `sequences` on every page:
    the lengths (here), and per source its sequences in hashed order (`prepare_sequence_order`)."""
    con.execute(f"CREATE OR REPLACE TABLE {SEQ_LEN} AS SELECT seq_id, len(token_ids) AS seq_len FROM sequences")
    con.execute(f"""CREATE OR REPLACE TABLE {SEQ_ORDER} (source_id VARCHAR, seq_id BIGINT, seq_len BIGINT,
                                                          r BIGINT, n_total BIGINT)""")


def prepare_sequence_order(con, source_id: str, counts: WindowCounts = WindowCounts()) -> None:
    """The hashed order of `source_id`'s sequences for `WINDOW_TABLES` (windows of `counts.seed`)."""
    con.execute(f"INSERT INTO {SEQ_ORDER} SELECT $source, * FROM ({SEQUENCE_ORDER_SQL})",
                {"source": source_id, "seed": counts.seed})


def has_table(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [name]).fetchone()[0])


@dataclass
class ListQuery:
    source: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    min_lift: float | None = None
    min_density: float | None = None
    max_density: float | None = None
    status: str | None = None
    explainer: str | None = None
    text: str | None = None
    sort: str = "score"
    desc: bool = True
    offset: int = 0
    limit: int = 50

    def check(self) -> None:
        if self.sort not in SORTS:
            raise FeaturescribeError(f"unknown sort {self.sort!r}: use {', '.join(SORTS)}")
        if self.status and self.status not in STATUSES:
            raise FeaturescribeError(f"unknown status {self.status!r}: use {', '.join(STATUSES)}")
        if not (0 <= self.offset <= MAX_OFFSET) or not (1 <= self.limit <= 500):
            raise FeaturescribeError(f"offset must be 0 to {MAX_OFFSET} and limit 1 to 500")
        for name in ("min_score", "max_score", "min_lift", "min_density", "max_density"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # nan matched nothing: an empty list
                raise FeaturescribeError(f"{name} must be a finite number, not {value}")


_FILTERS = {  # ListQuery field -> SQL condition on the joined row
    "source": "source_id = $source",
    "min_score": "score >= $min_score",
    "max_score": "score <= $max_score",
    "min_lift": "lift >= $min_lift",
    "min_density": "frac_active >= $min_density",
    "max_density": "frac_active <= $max_density",
    "explainer": "explainer = $explainer",
    "text": "explanation ILIKE '%' || $text || '%'",
}
_STATUS_SQL = {
    "labelled": "explanation IS NOT NULL", "unlabelled": "explanation IS NULL",
    "alive": "coalesce(status, CASE WHEN n_active > 0 THEN 'alive' ELSE 'dead' END) = 'alive'",
    "dead": "n_active = 0 OR status = 'dead'", "rare": "status = 'rare'",
}


def list_features(con, q: ListQuery) -> tuple[list[dict], int]:
    """One page of features with their best label, and the number of features that match (two
    queries: a count, and a top-N sort that never materializes the other rows)."""
    q.check()
    where, params = [], {}
    for name, cond in _FILTERS.items():
        value = getattr(q, name)
        if value not in (None, ""):
            where.append(cond)
            params[name] = value
    if q.status:
        where.append(f"({_STATUS_SQL[q.status]})")
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    direction = "DESC" if q.desc else "ASC"
    cur = con.execute(f"""
        SELECT source_id, feature_id, n_active, frac_active, max_act, status, explanation, score,
               scorer, lift, explainer
        FROM {ROWS} {clause}
        ORDER BY {SORTS[q.sort]} {direction} NULLS LAST, source_id, feature_id
        LIMIT {int(q.limit)} OFFSET {int(q.offset)}""", params)
    cols = [c[0] for c in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    total = con.execute(f"SELECT count(*) FROM {ROWS} {clause}", params).fetchone()[0]
    return rows, int(total)


def meta(con) -> dict[str, Any]:
    """Sources, explainers and embedders, for the filters."""
    sources = [dict(zip(("source_id", "model_id", "hook_name", "layer", "kind", "width"), r)) for r in con.execute(
        "SELECT source_id, model_id, hook_name, layer, kind, width FROM sources ORDER BY source_id").fetchall()]
    explainers = [r[0] for r in con.execute("SELECT DISTINCT explainer FROM explanations ORDER BY 1").fetchall()]
    embedders = []
    if has_table(con, "label_embeddings"):
        embedders = [r[0] for r in con.execute(
            "SELECT embedder FROM label_embeddings GROUP BY 1 ORDER BY count(*) DESC").fetchall()]
    return {"sources": sources, "explainers": explainers, "embedders": embedders}


def feature_stats(con, source_id: str, feature_id: int) -> dict | None:
    cols = [r[0] for r in con.execute("DESCRIBE features").fetchall()]
    extra = ", promoted_tokens" if "promoted_tokens" in cols else ""
    cur = con.execute(f"""SELECT source_id, feature_id, n_active, frac_active, max_act, mean_act, status,
                                 skip_reason{extra}
                          FROM features WHERE source_id = ? AND feature_id = ?""", [source_id, int(feature_id)])
    row = cur.fetchone()
    return None if row is None else dict(zip([c[0] for c in cur.description], row))


def feature_explanations(con, source_id: str, feature_id: int, best_from: str = ROWS) -> list[dict]:
    """Every explanation of a feature with all its scores and baselines; the best label first
    (read from `best_from`: the app's in-memory rows, or the `labels` view)."""
    cur = con.execute("""
        WITH best AS (SELECT explanation_id FROM @ROWS@ WHERE source_id = $s AND feature_id = $f)
        SELECT e.explanation_id, e.text, e.explainer, e.method, e.candidate, e.chosen,
               coalesce(e.status, 'ok') AS status, e.error,
               e.explanation_id IN (SELECT explanation_id FROM best) AS is_best,
               list({'scorer': s.scorer, 'split': s.split, 'value': s.value, 'simulator': s.simulator,
                     'baseline_shuffled': s.baseline_shuffled, 'baseline_tokens': s.baseline_tokens,
                     'baseline_population': s.baseline_population,
                     'lift': s.value - coalesce(s.baseline_shuffled, s.baseline_population),
                     'n_examples': s.n_examples}
                    ORDER BY s.scorer, s.split) FILTER (WHERE s.scorer IS NOT NULL) AS scores
        FROM explanations e LEFT JOIN scores s USING (explanation_id)
        WHERE e.source_id = $s AND e.feature_id = $f
        GROUP BY ALL ORDER BY is_best DESC, e.chosen DESC NULLS LAST, e.candidate, e.explanation_id""".replace("@ROWS@", best_from),
        {"s": source_id, "f": int(feature_id)})
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r)) | {"scores": (r[cols.index("scores")] or [])} for r in cur.fetchall()]


def feature_histogram(con, source_id: str, feature_id: int, bins: int = HISTOGRAM_BINS) -> dict | None:
    row = con.execute(f"""
        WITH a AS (SELECT act FROM activations WHERE source_id = ? AND feature_id = ?),
        r AS (SELECT min(act) AS lo, max(act) AS hi FROM a)
        SELECT any_value(r.lo), any_value(r.hi),
               list(n ORDER BY bin) FILTER (WHERE bin IS NOT NULL), list(bin ORDER BY bin)
        FROM (SELECT CAST(CASE WHEN r.hi > r.lo THEN least({bins - 1}, floor((a.act - r.lo) / (r.hi - r.lo) * {bins}))
                               ELSE 0 END AS INTEGER) AS bin, count(*) AS n
              FROM a, r GROUP BY 1) JOIN r ON true""", [source_id, int(feature_id)]).fetchone()
    if row is None or row[0] is None:
        return None
    counts = [0] * bins
    for n, b in zip(row[2] or [], row[3] or []):
        counts[b] = int(n)
    return {"lo": float(row[0]), "hi": float(row[1]), "counts": counts}


def sampled_windows(con, source_id: str, feature_id: int) -> list[dict]:
    """The windows a label run sampled for the feature (from `examples`), with dense `acts`."""
    from featurescribe.store.windows import densify

    cur = con.execute("""
        SELECT x.kind, x.split, x.seq_id, x.start_pos, x.end_pos, x.rank, x.quantile,
               s.tokens[x.start_pos + 1 : x.end_pos] AS tokens,
               coalesce(list(a.pos - x.start_pos ORDER BY a.pos) FILTER (WHERE a.pos IS NOT NULL), []) AS nz_pos,
               coalesce(list(a.act ORDER BY a.pos) FILTER (WHERE a.pos IS NOT NULL), []) AS nz_act,
               coalesce(max(a.act), 0) AS win_max
        FROM examples x JOIN sequences s USING (seq_id)
        LEFT JOIN activations a ON a.source_id = x.source_id AND a.feature_id = x.feature_id
             AND a.seq_id = x.seq_id AND a.pos >= x.start_pos AND a.pos < x.end_pos
        WHERE x.source_id = $s AND x.feature_id = $f
        GROUP BY x.kind, x.split, x.seq_id, x.start_pos, x.end_pos, x.rank, x.quantile, s.tokens
        ORDER BY CASE x.kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END, win_max DESC, x.seq_id""",
        {"s": source_id, "f": int(feature_id)})
    cols = [c[0] for c in cur.description]
    return [densify(dict(zip(cols, r))) for r in cur.fetchall()]
