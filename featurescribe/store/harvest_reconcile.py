"""A harvest commit against what other runs wrote to the same file since it planned its batches.

A harvest plans its sequence ids when it reads the database, and commits each buffer later, opening
the file for each commit. Another run may commit in between (two harvests of different layers over
the same corpus, or of the same source). Inside the commit's transaction, with the file to itself:

- a new sequence that another run has stored meanwhile (same tokenizer, corpus and index) takes the
  stored one's id and is not inserted again;
- a new sequence whose planned id another run has given to a different sequence gets a fresh id;
- a (source, sequence) pair that another run has harvested meanwhile keeps that run's rows: this
  commit's progress row and kept entries for it are dropped.

Every check is one indexed or range-pruned query, and nothing is copied when nothing collides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurescribe.store.activation_store import KEYS_TABLE

FreshIds = Callable[[int, int], np.ndarray]  # (how many, lowest allowed) -> unused seq ids


@dataclass
class Rows:
    sequences: pa.Table | None  # new sequences: seq_id, token_ids, tokens, tokenizer_id, corpus, corpus_index
    activations: pa.Table | None  # source_key, feature_id, seq_id, pos, act
    progress: pa.Table  # source_id, seq_id


def reconcile(con, rows: Rows, fresh_ids: FreshIds) -> Rows:
    """The rows to insert, after the other runs' commits (see the module's docstring)."""
    if rows.sequences is not None and rows.sequences.num_rows:
        rows = _reconcile_sequences(con, rows, fresh_ids)
    return _drop_harvested(con, rows)


def _reconcile_sequences(con, rows: Rows, fresh_ids: FreshIds) -> Rows:
    seqs = rows.sequences
    planned = seqs.column("seq_id").to_numpy()
    index = seqs.column("corpus_index").to_numpy()
    stored = _stored_ids(con, seqs, index)
    taken = _taken_ids(con, planned)
    if not stored and not taken:
        return rows
    target = planned.copy()
    same = np.array([i in stored for i in index.tolist()], dtype=bool)
    target[same] = [stored[i] for i in index[same].tolist()]
    clash = ~same & np.isin(planned, np.fromiter(taken, np.int64, len(taken)))
    if clash.any():
        top = con.execute("SELECT coalesce(max(seq_id) + 1, 0) FROM sequences").fetchone()[0]
        target[clash] = fresh_ids(int(clash.sum()), int(top))
    mapping = (planned, target)
    new = None if same.all() else _remap_table(seqs.filter(pa.array(~same)), mapping)
    return Rows(new, _remap_table(rows.activations, mapping), _remap_table(rows.progress, mapping))


def _stored_ids(con, seqs: pa.Table, index: np.ndarray) -> dict[int, int]:
    """corpus_index -> seq_id of the planned new sequences that are stored already."""
    tok, corpus = seqs.column("tokenizer_id")[0].as_py(), seqs.column("corpus")[0].as_py()
    found = con.execute(
        "SELECT corpus_index, seq_id FROM sequences WHERE tokenizer_id = $tok AND corpus = $corpus "
        "AND corpus_index BETWEEN $lo AND $hi",
        {"tok": tok, "corpus": corpus, "lo": int(index.min()), "hi": int(index.max())}).fetchnumpy()
    mine = np.isin(found["corpus_index"], index)  # the range also holds the other writer's sequences
    return dict(zip(found["corpus_index"][mine].tolist(), found["seq_id"][mine].tolist()))


def _taken_ids(con, planned: np.ndarray) -> set[int]:
    found = con.execute("SELECT seq_id FROM sequences WHERE seq_id BETWEEN $lo AND $hi",
                        {"lo": int(planned.min()), "hi": int(planned.max())}).fetchnumpy()["seq_id"]
    return set(found[np.isin(found, planned)].tolist())


def _remap_table(tbl: pa.Table | None, mapping: tuple[np.ndarray, np.ndarray]) -> pa.Table | None:
    planned, target = mapping
    if tbl is None or np.array_equal(planned, target):
        return tbl
    order = np.argsort(planned)
    ids = tbl.column("seq_id").to_numpy()
    pos = np.searchsorted(planned[order], ids)
    hit = pos < len(planned)
    hit[hit] = planned[order][pos[hit]] == ids[hit]
    out = ids.copy()
    out[hit] = target[order][pos[hit]]
    at = tbl.column_names.index("seq_id")
    return tbl.set_column(at, "seq_id", pa.array(out, pa.int64()))


def _drop_harvested(con, rows: Rows) -> Rows:
    """Without the (source, sequence) pairs another run has harvested since this one planned."""
    prog = rows.progress
    seq = prog.column("seq_id").to_numpy()
    if not len(seq):
        return rows
    source_col = prog.column("source_id").combine_chunks().cast(pa.string())
    in_range = con.execute(  # the range holds few other rows (another writer's batches): filtered here
        "SELECT source_id, seq_id FROM harvest_progress WHERE seq_id BETWEEN $lo AND $hi "
        "AND list_contains($sources, source_id)",
        {"sources": pc.unique(source_col).to_pylist(), "lo": int(seq.min()), "hi": int(seq.max())}).fetchnumpy()
    mine = np.isin(in_range["seq_id"], seq)
    done = [(sid, in_range["seq_id"][mine & (in_range["source_id"] == sid)]) for sid in
            np.unique(in_range["source_id"][mine]).tolist()]
    if not done:
        return rows
    keys = dict(con.execute(f"SELECT source_id, source_key FROM {KEYS_TABLE} WHERE list_contains($s, source_id)",
                            {"s": [d[0] for d in done]}).fetchall())
    acts = rows.activations
    keep_prog = np.ones(len(seq), dtype=bool)
    keep_acts = None if acts is None else np.ones(acts.num_rows, dtype=bool)
    for source_id, seq_ids in done:
        keep_prog &= ~(pc.equal(source_col, source_id).to_numpy(zero_copy_only=False) & np.isin(seq, seq_ids))
        if acts is not None:
            keep_acts &= ~((acts.column("source_key").to_numpy() == keys[source_id])
                           & np.isin(acts.column("seq_id").to_numpy(), seq_ids))
    return Rows(rows.sequences, None if acts is None else acts.filter(pa.array(keep_acts)),
                prog.filter(pa.array(keep_prog)))
