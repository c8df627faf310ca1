"""A writer thread's staging buffer: fixed columns that kept entries are copied into as they arrive.

Each writer owns one, allocated (and its pages touched) when the writer starts, so the memory a
harvest holds in flight is the same from its first batch to its last, whatever the corpus size.
An item's arrays are copied in on arrival and dropped, and a commit inserts zero-copy Arrow views of
the filled rows: no concatenation and no fresh million-row allocation per commit.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

COLUMNS = {"source_key": np.int32, "feature_id": np.int32, "seq_id": np.int64, "pos": np.int32,
           "act": np.float32}


class Staging:
    def __init__(self, capacity: int, source_keys: list[int]):
        self.capacity = max(0, int(capacity))
        self.keys = np.asarray(source_keys, dtype=np.int32)
        self.cols = {name: np.zeros(self.capacity, dtype) for name, dtype in COLUMNS.items()}
        for col in self.cols.values():
            col.fill(0)  # resident now, not when the first large harvest reaches it
        self.n = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def add(self, item) -> None:
        """Copy an item's entries in (the caller checked `room`)."""
        c, at = self.cols, self.n
        for k, idx, vals in item.parts:
            m = len(vals)
            if not m:
                continue
            end = at + m
            c["source_key"][at:end] = self.keys[k]
            c["feature_id"][at:end] = idx[:, 2]
            np.take(item.batch.seq_ids, idx[:, 0], out=c["seq_id"][at:end])
            c["pos"][at:end] = idx[:, 1]
            c["act"][at:end] = vals
            at = end
        self.n = at

    def table(self) -> pa.Table | None:
        """The staged rows as Arrow columns over the buffer (valid until `clear`)."""
        if not self.n:
            return None
        return pa.table({name: pa.array(col[: self.n]) for name, col in self.cols.items()})

    def clear(self) -> None:
        self.n = 0
