"""The harvest's writers: threads that turn kept entries into Arrow tables and commit them to DuckDB.

The forward loop only hands each batch's entries (numpy arrays) to a queue. Writer threads take
items from it, copy their entries into a fixed staging buffer of `flush_entries` rows (harvest/staging.py) until it is full (or `flush_s` seconds passed), and commit
one transaction per buffer: new sequences, the entries of every source in ONE insert (each row's
integer `source_key`, see store/activation_store.py) and the progress rows of those batches. DuckDB
loads a million-row Arrow insert several times faster than the same rows in small inserts; a
harvest's batches alone hold tens of thousands of entries.

Each commit opens the database for its transaction and closes it after (`store.connection.session`
of a `Database`), so between commits the file is free for readers and other runs; a buffer is big
enough (seconds of forward passes) that opening and the checkpoint at closing cost little.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from featurescribe.harvest.batches import Batch, SeqIds
from featurescribe.harvest.staging import Staging
from featurescribe.native_memory import return_freed_memory

FLUSH_ENTRIES = 1 << 20
FLUSH_SECONDS = 30.0  # each commit opens and checkpoints the file: ~0.1 s of CPU the forward pass shares
WRITER_THREADS = 2


def const_strings(value: str, n: int) -> pa.Array:
    """A string column of n copies of value, built from buffers (no Python loop)."""
    b = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(b)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b * n))


class TokenStrings:
    """Token id -> its text as the tokenizer decodes that one token (' def' keeps its space).

    Each id is decoded once, when first seen; a batch's `tokens` column is then a vectorized take.
    The table holds `len(tokenizer)` ids and grows if an id lies past them (reading the whole
    vocabulary to find its largest id would take 0.02 s with the GIL held).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.text = np.empty(0, dtype=object)
        self.known = np.zeros(0, dtype=bool)
        self.decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._lock = threading.Lock()

    def _grow(self, top: int) -> None:
        n = max(len(self.tok), top)
        self.text = np.concatenate([self.text, np.empty(n - len(self.text), dtype=object)])
        self.known = np.concatenate([self.known, np.zeros(n - len(self.known), dtype=bool)])

    def _text(self, piece: str | None) -> str:
        if piece is None:
            return ""
        if self.decoder is not None:
            return self.decoder.decode([piece])
        return self.tok.convert_tokens_to_string([piece])

    def __call__(self, ids: np.ndarray) -> pa.Array:
        uniq = np.unique(ids)
        with self._lock:
            if len(uniq) and uniq[-1] >= len(self.text):
                self._grow(int(uniq[-1]) + 1)
            new = uniq[~self.known[uniq]]
            if len(new):
                # one call for all new ids: transformers spends ~60 us on each call, with the GIL held
                pieces = self.tok.convert_ids_to_tokens(new.tolist())
                self.text[new] = np.array([self._text(p) for p in pieces], dtype=object)
                self.known[new] = True
        return pa.array(self.text[ids], type=pa.string())


@dataclass
class Item:
    batch: Batch
    parts: list[tuple[int, np.ndarray, np.ndarray]]  # (source index, idx int32 [N, 3]: row/pos/feature, vals)

    @property
    def n_entries(self) -> int:
        return sum(len(v) for _, _, v in self.parts)


@dataclass
class RowMaker:
    """Builds the Arrow tables of a buffer of items."""

    source_ids: list[str]
    source_keys: list[int]  # each source's storage key (store.harvest_rows.harvest_source_keys)
    tokenizer_id: str
    corpus_key: str
    token_strings: TokenStrings
    seq_ids: SeqIds | None = None  # the harvest's id allocator: commits reconcile with other runs

    def _dict(self, keys: np.ndarray) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(keys.astype(np.int16)), pa.array(self.source_ids))

    def sequences(self, items: list[Item]) -> pa.Table | None:
        rows = [(it.batch, r) for it in items for r in np.flatnonzero(it.batch.new)]
        if not rows:
            return None
        toks = [b.token_ids[r] for b, r in rows]
        lens = np.array([len(t) for t in toks], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        flat = np.concatenate(toks).astype(np.int32)
        return pa.table({
            "seq_id": pa.array(np.array([b.seq_ids[r] for b, r in rows], dtype=np.int64)),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat)),
            "tokens": pa.ListArray.from_arrays(offsets, self.token_strings(flat)),
            "tokenizer_id": const_strings(self.tokenizer_id, len(rows)),
            "corpus": const_strings(self.corpus_key, len(rows)),
            "corpus_index": pa.array(np.array([b.corpus_index[r] for b, r in rows], dtype=np.int64)),
        })

    def activations(self, items: list[Item]) -> pa.Table | None:
        parts = [(k, it.batch, idx, vals) for it in items for k, idx, vals in it.parts if len(vals)]
        if not parts:
            return None
        keys = np.asarray(self.source_keys, dtype=np.int32)
        return pa.table({
            "source_key": np.concatenate([np.full(len(v), keys[k], np.int32) for k, _, _, v in parts]),
            "feature_id": pa.array(np.concatenate([idx[:, 2] for _, _, idx, _ in parts])),
            "seq_id": pa.array(np.concatenate([b.seq_ids[idx[:, 0]] for _, b, idx, _ in parts])),
            "pos": pa.array(np.concatenate([idx[:, 1] for _, _, idx, _ in parts])),
            "act": pa.array(np.concatenate([v for _, _, _, v in parts])),
        })

    def progress(self, items: list[Item]) -> pa.Table:
        keys, seqs = [], []
        for it in items:
            todo = it.batch.todo
            for k in range(len(self.source_ids)):
                rows = it.batch.seq_ids if todo is None else it.batch.seq_ids[todo[k]]
                keys.append(np.full(len(rows), k, np.int16))
                seqs.append(rows)
        return pa.table({"source_id": self._dict(np.concatenate(keys)), "seq_id": pa.array(np.concatenate(seqs))})


class Writers:
    """Writer threads sharing one queue; `put` hands over an item, `close` drains and stops them."""

    def __init__(self, db, rows: RowMaker, threads: int = WRITER_THREADS, flush_entries: int = FLUSH_ENTRIES,
                 flush_s: float = FLUSH_SECONDS, first_commit=None):
        """`first_commit(con)`: runs once, in the first commit's transaction, before its rows; the other
        writers' commits wait until that one is done (or failed: then the next one runs it)."""
        self.db, self.rows, self.flush_entries, self.flush_s = db, rows, flush_entries, flush_s
        self._first_commit, self._first_done, self._first_lock = first_commit, first_commit is None, threading.Lock()
        self.q: queue.Queue = queue.Queue(maxsize=4 * threads)
        self.error: BaseException | None = None
        self.entries = self.commits = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"harvest-writer-{i}", daemon=True)
                         for i in range(max(1, threads))]
        self._running, self._last_pieces = len(self._threads), []
        for t in self._threads:
            t.start()

    def put(self, item: Item) -> None:
        """Hand an item over (waiting while the queue is full); a writer's error is raised here."""
        self._send(item, stop_on_error=True)

    def close(self) -> None:
        """Write what is queued, then stop; re-raise a writer error. After one writer's error the
        others still commit what they hold."""
        for t in self._threads:
            if t.is_alive():
                self._send(None, stop_on_error=False)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error

    def _send(self, item: Item | None, stop_on_error: bool) -> None:
        while True:
            if stop_on_error and self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not any(t.is_alive() for t in self._threads):
                    if stop_on_error:
                        raise RuntimeError("the harvest writers stopped") from self.error
                    return

    def _run(self) -> None:
        try:
            self._loop(Staging(self.flush_entries, self.rows.source_keys))
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            self.error = err
        finally:
            self._stopped()

    def _stopped(self) -> None:
        """The last writer to stop commits what every writer still held, in one transaction (one
        transaction's fixed costs instead of one per writer, at the end where nothing overlaps them);
        also after another writer's error, so that what was computed is kept."""
        with self._lock:
            self._running -= 1
            pieces, last = self._last_pieces, self._running == 0
            if last:
                self._last_pieces = []
        if last and pieces:
            try:
                self._commit(pieces)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error = self.error or err

    def _loop(self, stage: Staging) -> None:
        """Stage items until the buffer is full (or `flush_s` passed), then commit them in one
        transaction. An item larger than the whole buffer is committed alone, from its own arrays."""
        buf: list[Item] = []
        since = time.monotonic()
        while True:
            try:
                item = self.q.get(timeout=0.5)
            except queue.Empty:
                item = False  # nothing new: maybe time to flush
            if item:
                if item.n_entries > stage.room and buf:
                    self._commit([(buf, stage)])
                    buf = []
                if not buf:
                    since = time.monotonic()
                if item.n_entries <= stage.room:
                    stage.add(item)
                    item = Item(item.batch, [])  # the entries are staged: only the batch is kept
                buf.append(item)
            if item is None:
                if buf:
                    with self._lock:
                        self._last_pieces.append((buf, stage))  # committed by the last writer to stop
                return
            if buf and (stage.room == 0 or buf[-1].parts or time.monotonic() - since >= self.flush_s):
                self._commit([(buf, stage)])
                buf = []

    def _commit(self, pieces: list[tuple[list[Item], Staging]]) -> None:
        """One transaction for the items of one or more buffers (each with its staging buffer)."""
        from featurescribe.store.connection import session
        from featurescribe.store.harvest_rows import write_harvest_rows

        items = [it for its, _ in pieces for it in its]
        acts = self._activations(pieces)
        seqs, progress = self.rows.sequences(items), self.rows.progress(items)
        fresh = self.rows.seq_ids.take if self.rows.seq_ids is not None else None

        def write(before=None) -> int:
            with session(self.db) as con:  # open only for the transaction
                return write_harvest_rows(con, seqs, acts, progress, fresh, before)

        if self._first_done:
            n = write()
        else:
            with self._first_lock:
                n = write(None if self._first_done else self._first_commit)
                self._first_done = True
        return_freed_memory()
        for _, stage in pieces:
            stage.clear()
        with self._lock:
            self.entries += n
            self.commits += 1

    def _activations(self, pieces: list[tuple[list[Item], Staging]]) -> pa.Table | None:
        """The kept entries: a staged buffer's rows, or an item too large for it from its own arrays."""
        tables = [self.rows.activations(its) if its[-1].parts else stage.table() for its, stage in pieces]
        tables = [t for t in tables if t is not None]
        return pa.concat_tables(tables) if len(tables) > 1 else (tables[0] if tables else None)
