"""Batches of sequences for the forward pass: which sequences to run, their ids, a reader thread."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from featurescribe.harvest import corpus as corpus_mod


@dataclass
class Batch:
    seq_ids: np.ndarray  # int64 [B]
    corpus_index: np.ndarray  # int64 [B]
    token_ids: list[np.ndarray]  # int32 each
    new: np.ndarray  # bool [B]: sequences not yet in the `sequences` table
    todo: np.ndarray | None = None  # bool [n_sources, B]: rows each source still needs (None: all)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.token_ids))


@dataclass
class Plan:
    """What the database already holds for these sources and this corpus."""

    known_index: np.ndarray  # sorted corpus_index of existing sequences (same tokenizer + corpus key)
    known_seq: np.ndarray  # their seq_ids
    done_index: list[np.ndarray]  # per source: sorted corpus_index already harvested
    next_seq_id: int
    index_range: tuple[int, int | None] = (0, None)  # corpus indices to harvest: [lo, hi)


def _member(sorted_arr: np.ndarray, x: int) -> int:
    """Position of x in a sorted array, or -1."""
    i = int(np.searchsorted(sorted_arr, x))
    return i if i < len(sorted_arr) and sorted_arr[i] == x else -1


def is_member(sorted_arr: np.ndarray, x: int) -> bool:
    return _member(sorted_arr, x) >= 0


def in_range(seqs: Iterator[corpus_mod.Sequence], lo: int, hi: int | None) -> Iterator[corpus_mod.Sequence]:
    for s in seqs:
        if hi is not None and s.corpus_index >= hi:
            return
        if s.corpus_index >= lo:
            yield s


class SeqIds:
    """The ids a harvest gives its new sequences: one counter for the planning and for the writers,
    which take fresh ids at a commit where another run took planned ones (store/harvest_reconcile.py)."""

    def __init__(self, first: int):
        self._next, self._lock = int(first), threading.Lock()

    def take(self, n: int = 1, lowest: int = 0) -> np.ndarray:
        with self._lock:
            start = max(self._next, int(lowest))
            self._next = start + n
        return np.arange(start, start + n, dtype=np.int64)


def make_batches(seqs: Iterator[corpus_mod.Sequence], plan: Plan, batch_size: int,
                 ids: SeqIds | None = None) -> Iterator[Batch]:
    """Batches of the sequences some source still needs; new sequences get the next free ids."""
    ids = ids or SeqIds(plan.next_seq_id)
    buf: list[tuple[int, int, np.ndarray, bool, list[bool]]] = []
    for s in in_range(seqs, *plan.index_range):
        todo = [_member(done, s.corpus_index) < 0 for done in plan.done_index]
        if not any(todo):
            continue
        k = _member(plan.known_index, s.corpus_index)
        if k >= 0:
            sid, new = int(plan.known_seq[k]), False
        else:
            sid, new = int(ids.take()[0]), True
        buf.append((sid, s.corpus_index, s.token_ids, new, todo))
        if len(buf) == batch_size:
            yield _mk_batch(buf)
            buf = []
    if buf:
        yield _mk_batch(buf)


def _mk_batch(buf) -> Batch:
    return Batch(np.array([b[0] for b in buf], dtype=np.int64), np.array([b[1] for b in buf], dtype=np.int64),
                 [b[2] for b in buf], np.array([b[3] for b in buf], dtype=bool),
                 np.array([b[4] for b in buf], dtype=bool).T.copy())


class Prefetch:
    """Runs an iterator in a thread, a few items ahead."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._it, self._stop, self.error = it, threading.Event(), None
        self._t = threading.Thread(target=self._run, name="harvest-reader", daemon=True)
        self._t.start()

    def _run(self):
        try:
            for item in self._it:
                if not self._put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self.error = err
        finally:
            self._put(self._END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def close(self):
        self._stop.set()
        self._t.join(timeout=5)
