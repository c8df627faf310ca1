"""Sharded harvests: each shard file's manifest, and the merge of shard files into the main database.

A shard file is an ordinary featurescribe database holding one part of the corpus (its own
`sequences`, `activations`, `harvest_progress`, `sources`) plus a one-row `harvest_shard` manifest.
The merge maps each shard's sequences to the main database's ids by corpus position (sequences the
main database already has keep their ids; new ones are numbered in corpus order after its largest),
and skips every (source, sequence) the main database has already harvested, so merging twice adds
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from featurescribe.store.activation_store import KEYS_TABLE, ROWS_TABLE, source_keys

MANIFEST = """
CREATE TABLE IF NOT EXISTS harvest_shard (
    shard_index INTEGER NOT NULL, shards INTEGER NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL,
    settings JSON NOT NULL, status VARCHAR NOT NULL
)
"""


def read_manifest(con) -> dict | None:
    con.execute(MANIFEST)
    row = con.execute("SELECT shard_index, shards, lo, hi, settings, status FROM harvest_shard").fetchone()
    if row is None:
        return None
    return {"shard_index": row[0], "shards": row[1], "lo": row[2], "hi": row[3], "settings": json.loads(row[4]),
            "status": row[5]}


def write_manifest(con, shard_index: int, shards: int, lo: int, hi: int, settings: dict, status: str) -> None:
    con.execute(MANIFEST)
    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM harvest_shard")
    con.execute("INSERT INTO harvest_shard VALUES (?, ?, ?, ?, ?, ?)",
                [shard_index, shards, lo, hi, json.dumps(settings, sort_keys=True), status])
    con.execute("COMMIT")


def _attach(con, paths: list[Path]) -> list[str]:
    names = []
    for i, p in enumerate(paths):
        name = f"shard{i}"
        con.execute(f"ATTACH '{str(p).replace(chr(39), chr(39) * 2)}' AS {name} (READ_ONLY)")
        names.append(name)
    return names


def _seq_map(con, names: list[str]) -> None:
    """temp.seq_map(shard, shard_seq_id, seq_id, new): every shard sequence's id in the main database."""
    union = " UNION ALL ".join(
        f"SELECT {i} AS shard, seq_id AS shard_seq_id, tokenizer_id, corpus, corpus_index FROM {n}.sequences"
        for i, n in enumerate(names))
    nxt = con.execute("SELECT coalesce(max(seq_id) + 1, 0) FROM main.sequences").fetchone()[0]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE seq_map AS
        SELECT x.shard, x.shard_seq_id, m.seq_id IS NULL AS new,
               coalesce(m.seq_id, {int(nxt)} - 1 + row_number() OVER (
                   PARTITION BY m.seq_id IS NULL ORDER BY x.corpus_index)) AS seq_id
        FROM ({union}) x
        LEFT JOIN main.sequences m USING (tokenizer_id, corpus, corpus_index)
    """)


def _copy_shard(con, i: int, name: str) -> None:
    con.execute(f"""
        INSERT INTO main.sequences (seq_id, token_ids, tokens, tokenizer_id, corpus, corpus_index)
        SELECT m.seq_id, s.token_ids, s.tokens, s.tokenizer_id, s.corpus, s.corpus_index
        FROM {name}.sequences s JOIN seq_map m ON m.shard = {i} AND m.shard_seq_id = s.seq_id WHERE m.new
    """)
    con.execute(f"""
        INSERT INTO main.sources BY NAME
        SELECT * FROM {name}.sources s WHERE s.source_id NOT IN (SELECT source_id FROM main.sources)
    """)
    fresh = f"""
        FROM {name}.harvest_progress p JOIN seq_map m ON m.shard = {i} AND m.shard_seq_id = p.seq_id
        WHERE NOT EXISTS (SELECT 1 FROM main.harvest_progress q WHERE q.source_id = p.source_id AND q.seq_id = m.seq_id)
    """
    shard_ids = [r[0] for r in con.execute(f"SELECT source_id FROM {name}.{KEYS_TABLE} ORDER BY source_key").fetchall()]
    source_keys(con, shard_ids)
    con.execute(f"""
        INSERT INTO main.{ROWS_TABLE} (source_key, feature_id, seq_id, pos, act)
        SELECT k.source_key, a.feature_id, m.seq_id, a.pos, a.act
        FROM {name}.{ROWS_TABLE} a
        JOIN (SELECT s.source_key AS shard_key, k.source_key, k.source_id
              FROM {name}.{KEYS_TABLE} s JOIN main.{KEYS_TABLE} k USING (source_id)) k ON k.shard_key = a.source_key
        JOIN (SELECT p.source_id, p.seq_id AS shard_seq_id, m.seq_id {fresh}) m
             ON m.source_id = k.source_id AND m.shard_seq_id = a.seq_id
    """)
    con.execute(f"INSERT INTO main.harvest_progress (source_id, seq_id) SELECT p.source_id, m.seq_id {fresh}")


def merge_shard_files(con, paths: list[Path]) -> None:
    """Copy every shard file's rows into the database of `con`, in one transaction."""
    names = _attach(con, paths)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            _seq_map(con, names)
            for i, n in enumerate(names):
                _copy_shard(con, i, n)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.execute("DROP TABLE IF EXISTS temp.seq_map")
        for n in names:
            con.execute(f"DETACH {n}")


def source_thresholds(con) -> dict[str, float]:
    return {sid: float(t) for sid, t in con.execute("SELECT source_id, threshold FROM sources").fetchall()
            if t is not None}
