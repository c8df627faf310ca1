"""The harvest's SQL: what a database already holds, the batch transaction, final statistics.

The harvest (featurescribe/harvest/) computes; this module is all it says to DuckDB.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from featurescribe.errors import FeaturescribeError
from featurescribe.store.activation_store import delete_activations, insert_key_rows, source_keys
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.memory import limit_memory
from featurescribe.store.transaction import transaction

SOURCE_SETTINGS = ("model_id", "hook_name", "layer", "kind", "width", "sae_path", "corpus", "ctx")


def _transaction(con, fn, *args):
    with transaction(con):
        return fn(con, *args)


def known_sequences(con, tokenizer_id: str, corpus_key: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(corpus_index sorted, their seq_id, next free seq_id) of the sequences already stored."""
    known = con.execute(
        "SELECT corpus_index, seq_id FROM sequences WHERE tokenizer_id = ? AND corpus = ? ORDER BY corpus_index",
        [tokenizer_id, corpus_key]).fetchnumpy()
    nxt = con.execute("SELECT coalesce(max(seq_id) + 1, 0) FROM sequences").fetchone()[0]
    return (np.asarray(known["corpus_index"], dtype=np.int64), np.asarray(known["seq_id"], dtype=np.int64),
            int(nxt))


def done_corpus_indices(con, source_ids: list[str], tokenizer_id: str, corpus_key: str) -> list[np.ndarray]:
    """Per source, the sorted corpus_index of the sequences already harvested (one query for all)."""
    done = con.execute(
        "SELECT list_position($ids, p.source_id) - 1 AS k, s.corpus_index FROM harvest_progress p "
        "JOIN sequences s USING (seq_id) WHERE list_contains($ids, p.source_id) AND s.tokenizer_id = $tok "
        "AND s.corpus = $corpus ORDER BY 1, 2",
        {"ids": list(source_ids), "tok": tokenizer_id, "corpus": corpus_key}).fetchnumpy()
    k, index = np.asarray(done["k"], dtype=np.int64), np.asarray(done["corpus_index"], dtype=np.int64)
    bounds = np.searchsorted(k, np.arange(len(source_ids) + 1))
    return [index[bounds[i]:bounds[i + 1]] for i in range(len(source_ids))]


def source_settings(con, source_id: str) -> dict[str, Any] | None:
    """A stored source's settings (SOURCE_SETTINGS, tokenizer_id, threshold), or None."""
    row = con.execute(f"SELECT {', '.join(SOURCE_SETTINGS)}, threshold, params FROM sources WHERE source_id = ?",
                      [source_id]).fetchone()
    if row is None:
        return None
    have = dict(zip(SOURCE_SETTINGS, row[: len(SOURCE_SETTINGS)]))
    params = json.loads(row[-1]) if row[-1] else {}
    have["tokenizer_id"] = params.get("tokenizer_id")
    if params.get("corpus_key"):  # the corpus's identity (its files' sizes and times), where recorded
        have["corpus_key"] = params["corpus_key"]
    have["threshold"] = float(row[-2]) if row[-2] is not None else None
    return have


def refuse_unfinished(con, source_ids: list[str], where: str = "") -> None:
    """FeaturescribeError naming the sources a harvest created and has not finished (`params.status`
    'running'): their statistics are written last, so they read as having no features yet."""
    rows = con.execute("SELECT source_id FROM sources WHERE source_id IN (SELECT unnest(?)) "
                       "AND json_extract_string(params, '$.status') = 'running' ORDER BY source_id",
                       [source_ids]).fetchall()
    if rows:
        raise FeaturescribeError(
            f"source {', '.join(r[0] for r in rows)}{where} is not fully harvested (its harvest was "
            "interrupted or is still running): run the same harvest command again to finish it first")


def source_params(con, source_id: str) -> dict:
    row = con.execute("SELECT params FROM sources WHERE source_id = ?", [source_id]).fetchone()
    return json.loads(row[0]) if row and row[0] else {}


# A sequence stays while anything else reads it: another source's harvest, or the windows and
# simulations of labels already stored (`delete_source` keeps those).
_ORPHANED_SEQUENCES = """
    DELETE FROM sequences
    WHERE seq_id IN (SELECT seq_id FROM harvest_progress WHERE source_id = $source)
      AND seq_id NOT IN (SELECT seq_id FROM harvest_progress WHERE source_id <> $source)
      AND seq_id NOT IN (SELECT seq_id FROM examples)
      AND seq_id NOT IN (SELECT seq_id FROM simulations)
"""


def delete_source(con, source_id: str) -> None:
    """A source's activations, features, progress and `sources` row, and the sequences only it
    used (harvest --overwrite with another corpus must not leave the old corpus behind)."""
    def run(c):
        c.execute(_ORPHANED_SEQUENCES, {"source": source_id})
        delete_activations(c, source_id)
        for table in ("features", "harvest_progress", "sources"):
            c.execute(f"DELETE FROM {table} WHERE source_id = ?", [source_id])
    _transaction(con, run)


def insert_sources(con, rows: list[dict]) -> None:
    """`sources` rows, inside the caller's transaction."""
    if rows:
        insert_arrow(con, "sources", pa.Table.from_pylist(rows))


def set_source_threshold(con, source_id: str, threshold: float) -> None:
    con.execute("UPDATE sources SET threshold = ? WHERE source_id = ?", [threshold, source_id])


def write_harvest_rows(con, sequences: pa.Table | None, activations: pa.Table | None, progress: pa.Table,
                       fresh_ids=None, before=None) -> int:
    """One transaction: new sequences, kept entries and the progress rows that mark them done;
    -> the kept entries inserted. `before(con)`, when given, runs first in the same transaction
    (a harvest's first commit writes its new sources' rows there).

    `activations` carries each row's `source_key` (see `harvest_source_keys`), `progress` its
    `source_id` as a dictionary column: one insert each for every source. With `fresh_ids` (a
    harvest's id allocator, see store/harvest_reconcile.py) the rows are first reconciled with what
    other runs committed to the file since the harvest planned them.
    """
    from featurescribe.store.harvest_reconcile import Rows, reconcile

    def run(c):
        if before is not None:
            before(c)
        rows = Rows(sequences, activations, progress)
        if fresh_ids is not None:
            rows = reconcile(c, rows, fresh_ids)
        if rows.sequences is not None:
            insert_arrow(c, "sequences", rows.sequences)
        n = insert_key_rows(c, rows.activations) if rows.activations is not None else 0
        insert_arrow(c, "harvest_progress", rows.progress)
        return n
    return _transaction(con, run)


def harvest_source_keys(con, source_ids: list[str]) -> list[int]:
    """The storage key of each source, in order (allocated for new sources)."""
    keys = _transaction(con, source_keys, source_ids)
    return [keys[s] for s in source_ids]


def finalize_sources(con, sources: list[tuple[str, int, dict]], first_pos: int) -> list[tuple[int, int, int, int]]:
    """Exact per-feature stats of several sources (source_id, width, params) from their stored
    entries, in one transaction and one pass over their rows; sources.n_tokens and params.
    -> per source (n_seq, n_tok, n_act, alive)."""
    ids = [sid for sid, _, _ in sources]
    counted = dict((r[0], r[1:]) for r in con.execute(
        "SELECT p.source_id, count(*), coalesce(sum(greatest(len(s.token_ids) - $first, 0)), 0) "
        "FROM harvest_progress p JOIN sequences s USING (seq_id) WHERE list_contains($ids, p.source_id) "
        "GROUP BY 1", {"first": first_pos, "ids": ids}).fetchall())
    tokens = [int(counted.get(sid, (0, 0))[1]) for sid in ids]
    limit_memory(con, new_keys=sum(int(w) for _, w, _ in sources))  # the features' key index
    _transaction(con, _write_features, ids, tokens, [int(w) for _, w, _ in sources],
                 [json.dumps(params) for _, _, params in sources])
    active = dict((r[0], r[1:]) for r in con.execute(
        "SELECT source_id, coalesce(sum(n_active), 0), count(*) FILTER (WHERE n_active > 0) FROM features "
        "WHERE list_contains($ids, source_id) GROUP BY 1", {"ids": ids}).fetchall())
    return [(int(counted.get(sid, (0, 0))[0]), n_tok, *map(int, active.get(sid, (0, 0))))
            for sid, n_tok in zip(ids, tokens)]


def _write_features(con, ids: list[str], tokens: list[int], widths: list[int], params: list[str]) -> None:
    args = {"ids": ids, "tokens": tokens, "widths": widths, "params": params}
    given = "SELECT unnest($ids) AS source_id, unnest($tokens) AS n_tok, unnest($widths) AS width, " \
            "unnest($params) AS params"
    con.execute("DELETE FROM features WHERE list_contains($ids, source_id)", {"ids": ids})
    con.execute(
        f"""
        INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act, status)
        SELECT g.source_id, f.i::INTEGER, coalesce(a.n, 0), coalesce(a.n, 0) / greatest(g.n_tok, 1)::DOUBLE,
               a.mx, a.mean, CASE WHEN a.n IS NULL THEN 'dead' ELSE 'alive' END
        FROM ({given}) g CROSS JOIN LATERAL range(g.width) f(i)
        LEFT JOIN (SELECT source_id, feature_id, count(*) AS n, max(act) AS mx, avg(act) AS mean
                   FROM activations WHERE list_contains($ids, source_id) GROUP BY ALL) a
               ON a.source_id = g.source_id AND a.feature_id = f.i
        ORDER BY g.source_id, f.i
        """, args)
    con.execute(f"UPDATE sources SET n_tokens = g.n_tok, params = g.params FROM ({given}) g "
                "WHERE sources.source_id = g.source_id", args)
