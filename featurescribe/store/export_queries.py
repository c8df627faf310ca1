"""Reads for `featurescribe export` and `featurescribe report`, streamed feature by feature.

Each kind of row (features, explanations with their scores, example windows with their
activations, activation histograms, simulations) is one query over a whole source, ordered by
`feature_id`, read through an Arrow record-batch reader on its own cursor. `iter_feature_bundles`
walks those ordered streams side by side and yields one `FeatureBundle` per feature, so Python
only ever holds one record batch per stream and one feature, whatever the size of the database.

Values stored as REAL (`act`, `max_act`, `mean_act`, `true_acts`, `predicted`) are read through
their shortest decimal form (`x::VARCHAR::DOUBLE`), so 0.3 is written as 0.3, not as
0.30000001192092896, and the same database always gives the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from featurescribe.errors import FeaturescribeError, UnknownSource
from featurescribe.store.activation_store import STORAGE_TABLES
from featurescribe.store.harvest_rows import refuse_unfinished

BATCH_ROWS = 2048
HISTOGRAM_BINS = 24
KINDS_ORDER = "CASE kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END"

# REAL / FLOAT[] read through their shortest decimal text.
_F32 = "CAST(CAST({x} AS VARCHAR) AS DOUBLE)"
_F32_LIST = "list_transform({x}, lambda v: CAST(CAST(v AS VARCHAR) AS DOUBLE))"
_TS = "strftime({x}, '%Y-%m-%dT%H:%M:%S.%f')"


def _f32(x: str) -> str:
    return _F32.format(x=x)


def _f32_list(x: str) -> str:
    return _F32_LIST.format(x=x)


def _ts(x: str) -> str:
    return _TS.format(x=x)


@dataclass
class FeatureBundle:
    """Everything the exporters need about one feature."""

    source_id: str
    feature_id: int
    stats: dict[str, Any]
    explanations: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    histogram: dict[str, Any] | None = None
    simulations: list[dict[str, Any]] = field(default_factory=list)
    moments: dict[str, Any] | None = None  # mean, variance, skewness, kurtosis, quantile_boundaries

    def best_explanation(self) -> dict[str, Any] | None:
        for e in self.explanations:
            if e["is_best"]:
                return e
        return None

    def windows(self, kind: str) -> list[dict[str, Any]]:
        return [w for w in self.examples if w["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# small reads


def quiet(con) -> None:
    """No DuckDB progress bar on stderr: the export commands draw their own."""
    con.execute("SET enable_progress_bar = false")


def _rows(con, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def export_sources(con, source_id: str | None = None, db_label: str = "the database", *,
                   finished: bool = True) -> list[dict[str, Any]]:
    """The sources to export (one, or all by id), or a user error naming what is there; `finished`:
    refuse a source whose harvest has not ended (its statistics are written last)."""
    chosen = _chosen_sources(con, source_id, db_label)
    if finished:
        refuse_unfinished(con, [r["source_id"] for r in chosen], f" in {db_label}")
    return chosen


def _chosen_sources(con, source_id: str | None, db_label: str) -> list[dict[str, Any]]:
    rows = _rows(
        con,
        f"""SELECT source_id, model_id, hook_name, layer, kind, width, site, threshold, sae_path,
                   corpus, ctx, n_tokens, {_ts('created_at')} AS created_at
            FROM sources ORDER BY source_id""",
    )
    if not rows:
        raise FeaturescribeError(
            f"{db_label} has no sources to export (run featurescribe harvest first)"
        )
    if source_id is None:
        return rows
    chosen = [r for r in rows if r["source_id"] == source_id]
    if not chosen:
        have = ", ".join(r["source_id"] for r in rows)
        raise UnknownSource(f"unknown source {source_id!r} in {db_label} (it has: {have})")
    return chosen


def count_features(con, source_id: str) -> int:
    return int(con.execute("SELECT count(*) FROM features WHERE source_id = ?", [source_id]).fetchone()[0])


def count_sequences(con) -> int:
    return int(con.execute("SELECT count(*) FROM sequences").fetchone()[0])


def table_names(con) -> list[tuple[str, str]]:
    """(name, 'BASE TABLE' | 'VIEW') of the main schema, by name; not the tables the `activations`
    view stores its rows in (exported once, through the view)."""
    return [
        (r[0], r[1])
        for r in con.execute(
            """SELECT table_name, table_type FROM information_schema.tables
               WHERE table_schema = 'main' AND table_catalog = current_database()
               ORDER BY table_name"""
        ).fetchall()
        if r[0] not in STORAGE_TABLES
    ]


# Tables whose rows belong to one source, and how to pick them. The rest are global.
_SOURCE_FILTERS = {
    "sources": "source_id = $source",
    "features": "source_id = $source",
    "activations": "source_id = $source",
    "examples": "source_id = $source",
    "explanations": "source_id = $source",
    "harvest_progress": "source_id = $source",
    "labels": "source_id = $source",
    "scores": "explanation_id IN (SELECT explanation_id FROM explanations WHERE source_id = $source)",
    "simulations": "explanation_id IN (SELECT explanation_id FROM explanations WHERE source_id = $source)",
    "interventions": "explanation_id IN (SELECT explanation_id FROM explanations WHERE source_id = $source)",
    "sequences": (
        "seq_id IN (SELECT seq_id FROM examples WHERE source_id = $source"
        " UNION SELECT seq_id FROM activations WHERE source_id = $source)"
    ),
}


def copy_table_to_parquet(con, table: str, path: str, source_id: str | None) -> int:
    """Write one table (or view) to a Parquet file in a fixed row order; return its row count."""
    where, params = "", {}
    if source_id is not None and table in _SOURCE_FILTERS:
        where, params = f"WHERE {_SOURCE_FILTERS[table]}", {"source": source_id}
    select = f'SELECT * FROM "{table}" {where} ORDER BY ALL'
    quoted = path.replace("'", "''")
    quiet(con)
    con.execute(f"COPY ({select}) TO '{quoted}' (FORMAT parquet, COMPRESSION zstd)", params)
    return int(con.execute(f'SELECT count(*) FROM "{table}" {where}', params).fetchone()[0])


# ---------------------------------------------------------------------------------------------
# the per-feature streams


def _features_sql() -> str:
    return f"""
        SELECT feature_id, n_active, frac_active, {_f32('max_act')} AS max_act,
               {_f32('mean_act')} AS mean_act, status, skip_reason, output_rising, output_falling,
               from_json(output_effects->'rising_delta', '["DOUBLE"]') AS output_rising_delta,
               from_json(output_effects->'falling_delta', '["DOUBLE"]') AS output_falling_delta
        FROM features WHERE source_id = $source ORDER BY feature_id"""


def _explanations_sql() -> str:
    # one row per explanation, its scores as a list, and whether the `labels` view picks it
    return f"""
        WITH best AS (SELECT explanation_id FROM labels WHERE source_id = $source),
        sc AS (
            SELECT s.explanation_id,
                   list({{'scorer': s.scorer, 'value': s.value, 'simulator': s.simulator,
                          'split': s.split, 'n_examples': s.n_examples,
                          'baseline_shuffled': s.baseline_shuffled,
                          'baseline_tokens': s.baseline_tokens,
                          'baseline_population': s.baseline_population,
                          'details': CAST(s.details AS VARCHAR),
                          'created_at': {_ts('s.created_at')}}}
                        ORDER BY s.scorer, s.split NULLS LAST, s.simulator NULLS LAST, s.value,
                                 CAST(s.details AS VARCHAR)) AS scores
            FROM scores s JOIN explanations e USING (explanation_id)
            WHERE e.source_id = $source
            GROUP BY s.explanation_id)
        SELECT e.feature_id, e.explanation_id, e.text, e.explainer, e.method, e.candidate, e.chosen,
               coalesce(e.status, 'ok') AS status, e.run_id, {_ts('e.created_at')} AS created_at,
               coalesce(sc.scores, []) AS scores,
               e.explanation_id IN (SELECT explanation_id FROM best) AS is_best
        FROM explanations e LEFT JOIN sc USING (explanation_id)
        WHERE e.source_id = $source
        ORDER BY e.feature_id, e.candidate NULLS LAST, e.explanation_id"""


def _examples_sql(kinds: tuple[str, ...] | None, per_kind: int | None) -> str:
    kind_filter = ""
    if kinds:
        kind_filter = "AND kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"
    limit = ""
    if per_kind is not None:
        limit = (
            "QUALIFY row_number() OVER (PARTITION BY x.feature_id, x.kind "
            "ORDER BY win_max DESC, x.seq_id, x.start_pos, x.split) <= " + str(int(per_kind))
        )
    # the activations inside each window, as (offset, value) pairs; the rest of the window is 0
    return f"""
        WITH x AS (
            SELECT row_number() OVER (ORDER BY feature_id, kind, split, seq_id, start_pos, end_pos)
                       AS ex_row,
                   feature_id, seq_id, start_pos, end_pos, split, kind, rank, quantile
            FROM examples WHERE source_id = $source {kind_filter}),
        w AS (
            SELECT x.ex_row, list(a.pos - x.start_pos ORDER BY a.pos) AS nz_pos,
                   list({_f32('a.act')} ORDER BY a.pos) AS nz_act, max(a.act) AS win_max
            FROM x JOIN activations a
              ON a.source_id = $source AND a.feature_id = x.feature_id AND a.seq_id = x.seq_id
             AND a.pos >= x.start_pos AND a.pos < x.end_pos
            GROUP BY x.ex_row)
        SELECT x.feature_id, x.kind, x.split, x.seq_id, x.start_pos, x.end_pos, x.rank, x.quantile,
               s.tokens[x.start_pos + 1 : x.end_pos] AS tokens,
               coalesce(w.nz_pos, []) AS nz_pos, coalesce(w.nz_act, []) AS nz_act,
               coalesce(w.win_max, 0) AS win_max
        FROM x JOIN sequences s USING (seq_id) LEFT JOIN w USING (ex_row)
        {limit}
        ORDER BY x.feature_id, {KINDS_ORDER.replace('kind', 'x.kind')}, win_max DESC, x.seq_id,
                 x.start_pos, x.split"""


def _histogram_sql(bins: int) -> str:
    return f"""
        WITH a AS (SELECT feature_id, act FROM activations WHERE source_id = $source),
        r AS (SELECT feature_id, min(act) AS lo, max(act) AS hi, count(*) AS n FROM a GROUP BY 1),
        b AS (
            SELECT a.feature_id,
                   CAST(CASE WHEN r.hi > r.lo
                             THEN least({bins - 1}, floor((a.act - r.lo) / (r.hi - r.lo) * {bins}))
                             ELSE 0 END AS INTEGER) AS bin,
                   count(*) AS n
            FROM a JOIN r USING (feature_id) GROUP BY ALL)
        SELECT b.feature_id, {_f32('any_value(r.lo)')} AS lo, {_f32('any_value(r.hi)')} AS hi,
               list(b.bin ORDER BY b.bin) AS bins, list(b.n ORDER BY b.bin) AS counts
        FROM b JOIN r USING (feature_id)
        GROUP BY b.feature_id ORDER BY b.feature_id"""


def _simulations_sql() -> str:
    return f"""
        SELECT e.feature_id, m.explanation_id, m.simulator, m.split, m.kind, m.seq_id, m.start_pos,
               s.tokens[m.start_pos + 1 : m.start_pos + len(m.true_acts)] AS tokens,
               {_f32_list('m.true_acts')} AS true_acts, {_f32_list('m.predicted')} AS predicted
        FROM simulations m JOIN explanations e USING (explanation_id)
                           JOIN sequences s ON s.seq_id = m.seq_id
        WHERE e.source_id = $source
        ORDER BY e.feature_id, m.explanation_id, m.simulator, m.split,
                 {KINDS_ORDER.replace('kind', 'm.kind')}, m.seq_id, m.start_pos"""


class _Stream:
    """Rows of one query, read a record batch at a time, consumed in feature_id order."""

    def __init__(self, con, sql: str, params: dict, batch_rows: int):
        self._cur = con.cursor()
        quiet(self._cur)
        self._reader = self._cur.sql(sql, params=params).to_arrow_reader(batch_rows)
        self._rows: list[dict] = []
        self._i = 0
        self._done = False

    def _peek(self) -> dict | None:
        while self._i >= len(self._rows):
            if self._done:
                return None
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                self._done = True
                self._rows = []
                return None
            self._rows, self._i = batch.to_pylist(), 0
        return self._rows[self._i]

    def take(self, feature_id: int) -> list[dict]:
        """All rows of `feature_id`, dropping rows of smaller ids (features the table lacks)."""
        out = []
        while True:
            row = self._peek()
            if row is None or row["feature_id"] > feature_id:
                return out
            self._i += 1
            if row["feature_id"] == feature_id:
                out.append(row)

    def rows(self) -> Iterator[dict]:
        while (row := self._peek()) is not None:
            self._i += 1
            yield row

    def close(self) -> None:
        self._rows = []
        try:
            self._cur.close()
        except Exception:
            pass


def _densify(row: dict) -> dict:
    tokens = list(row["tokens"] or [])
    acts = [0.0] * len(tokens)
    for p, v in zip(row["nz_pos"], row["nz_act"]):
        if 0 <= p < len(acts):
            acts[p] = v
    return {
        "kind": row["kind"],
        "split": row["split"],
        "seq_id": row["seq_id"],
        "start_pos": row["start_pos"],
        "end_pos": row["end_pos"],
        "rank": row["rank"],
        "quantile": row["quantile"],
        "tokens": tokens,
        "acts": acts,
    }


def _histogram(row: dict, bins: int) -> dict:
    counts = [0] * bins
    for b, n in zip(row["bins"], row["counts"]):
        counts[b] = int(n)
    return {"lo": row["lo"], "hi": row["hi"], "counts": counts}


def _explanation(row: dict) -> dict:
    scores = []
    for s in row["scores"]:
        s = dict(s)
        s["details"] = json.loads(s["details"]) if s["details"] else None
        scores.append(s)
    row = dict(row)
    row["scores"] = scores
    return row


def _open_streams(con, source_id: str, *, explanations: bool, examples: bool, example_kinds, examples_per_kind,
                  histogram: bool, histogram_bins: int, simulations: bool, batch_rows: int,
                  fill_windows: bool, with_moments: bool, streams: dict[str, _Stream]) -> None:
    from featurescribe.store.moments import MOMENTS_SQL
    from featurescribe.store.windows import fill_stream_sql

    params = {"source": source_id}
    small = max(64, batch_rows // 8)
    streams["features"] = _Stream(con, _features_sql(), params, batch_rows)
    if explanations:
        streams["explanations"] = _Stream(con, _explanations_sql(), params, batch_rows)
    if examples:
        streams["examples"] = _Stream(con, _examples_sql(example_kinds, examples_per_kind), params, small)
        if fill_windows:
            sql, fill_params = fill_stream_sql(source_id)
            streams["filled"] = _Stream(con, sql, fill_params, small)
    if with_moments:
        streams["moments"] = _Stream(con, MOMENTS_SQL, params, batch_rows)
    if histogram:
        streams["histogram"] = _Stream(con, _histogram_sql(histogram_bins), params, batch_rows)
    if simulations:
        streams["simulations"] = _Stream(con, _simulations_sql(), params, small)


def _bundle(source_id: str, f: dict, streams: dict[str, _Stream], example_kinds, examples_per_kind,
            histogram_bins: int) -> FeatureBundle:
    from featurescribe.store.moments import moments
    from featurescribe.store.windows import keep_windows

    fid = f["feature_id"]
    b = FeatureBundle(source_id=source_id, feature_id=fid,
                      stats={k: v for k, v in f.items() if k != "feature_id"})
    if "explanations" in streams:
        b.explanations = [_explanation(r) for r in streams["explanations"].take(fid)]
    if "examples" in streams:
        b.examples = [_densify(r) for r in streams["examples"].take(fid)]
    if "filled" in streams:
        filled = streams["filled"].take(fid)
        if not b.examples:
            b.examples = keep_windows([_densify(r) for r in filled], example_kinds, examples_per_kind)
    if "moments" in streams:
        m = streams["moments"].take(fid)
        b.moments = moments(m[0]) if m else None
    if "histogram" in streams:
        h = streams["histogram"].take(fid)
        b.histogram = _histogram(h[0], histogram_bins) if h else None
    if "simulations" in streams:
        b.simulations = streams["simulations"].take(fid)
    return b


def iter_feature_bundles(
    con,
    source_id: str,
    *,
    explanations: bool = True,
    examples: bool = True,
    example_kinds: tuple[str, ...] | None = None,
    examples_per_kind: int | None = None,
    histogram: bool = False,
    histogram_bins: int = HISTOGRAM_BINS,
    simulations: bool = False,
    batch_rows: int = BATCH_ROWS,
    fill_windows: bool = True,
    with_moments: bool = False,
) -> Iterator[FeatureBundle]:
    """One bundle per row of `features` for `source_id`, in feature_id order, streamed.

    With `fill_windows`, a feature that no label run sampled gets top, quantile and random
    windows read from `activations` (store/windows.py, `split` None) instead of none;
    `with_moments` adds its moments and quantile boundaries (store/moments.py)."""
    streams: dict[str, _Stream] = {}
    try:
        _open_streams(con, source_id, explanations=explanations, examples=examples, example_kinds=example_kinds,
                      examples_per_kind=examples_per_kind, histogram=histogram, histogram_bins=histogram_bins,
                      simulations=simulations, batch_rows=batch_rows, fill_windows=fill_windows,
                      with_moments=with_moments, streams=streams)
        for f in streams["features"].rows():
            yield _bundle(source_id, f, streams, example_kinds, examples_per_kind, histogram_bins)
    finally:
        for s in streams.values():
            s.close()
