"""`MemoryCallStore`: the ledger and response cache of LLM calls, held in memory.

A Dask worker of the label flow must not open the database (only the flow's process writes
it), so its LLM clients record to one of these: cache look-ups answer from the entries it was
given (`cached`) and from its own new answers; ledger rows and new cache entries stay in memory.
The store travels back with the chunk's results (it pickles), and the flow writes it with
`flush_to(con)` inside the chunk's transaction.
"""

from __future__ import annotations

import json
import threading
import uuid

import pyarrow as pa

from featurescribe.store.bulk import insert_arrow
from featurescribe.store.llm_calls import STATUSES, CallRow, _KeyIndex, _LEDGER_COLUMNS, _arrow


class MemoryCallStore:
    """The CallStore interface (record, get_cached, put_cached, flush, close) without a database."""

    def __init__(self, cached: dict[str, dict] | None = None):
        self._cached = dict(cached or {})  # key -> response dict, given
        self._rows: list[CallRow] = []
        self._new: dict[str, tuple[str, str, str]] = {}  # key -> (backend, model, response json)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the client's side
    def record(self, row: CallRow) -> None:
        if row.status not in STATUSES:
            raise ValueError(f"unknown ledger status {row.status!r}")
        with self._lock:
            self._rows.append(row)

    def get_cached(self, key: str) -> dict | None:
        with self._lock:
            new = self._new.get(key)
            if new is not None:
                return json.loads(new[2])
            return self._cached.get(key)

    def put_cached(self, key: str, backend: str, model: str, response: dict) -> None:
        with self._lock:
            self._new[key] = (backend, model, json.dumps(response))

    def pending_rows(self) -> list[CallRow]:
        with self._lock:
            return list(self._rows)

    def flush(self) -> None:  # nothing to write to
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ the writer's side
    def outgoing(self) -> "MemoryCallStore":
        """A store with only what is new (rows, answers), to send back without the given cache."""
        out = MemoryCallStore()
        with self._lock:
            out._rows, out._new = list(self._rows), dict(self._new)
        return out

    def flush_to(self, con) -> int:
        """Write the rows and new cache entries on `con`, in the caller's transaction; returns
        the number of ledger rows written. The store is empty afterwards."""
        with self._lock:
            rows, self._rows = self._rows, []
            new, self._new = self._new, {}
        if rows:
            insert_arrow(con, "llm_calls", _arrow({c: [getattr(r, c) for r in rows] for c in _LEDGER_COLUMNS}))
        if new:
            _KeyIndex.note_written(con, new)  # the CallStores open on this file learn the keys
            keys = list(new)
            tbl = pa.table({
                "cache_key": pa.array(keys, type=pa.string()),
                "backend": pa.array([new[k][0] for k in keys], type=pa.string()),
                "model": pa.array([new[k][1] for k in keys], type=pa.string()),
                "response": pa.array([new[k][2] for k in keys], type=pa.string()),
            })
            view = f"_memcache_{uuid.uuid4().hex}"
            con.register(view, tbl)
            try:
                con.execute(
                    "INSERT OR REPLACE INTO llm_cache (cache_key, backend, model, response, created_at) "
                    f"SELECT cache_key, backend, model, response::JSON, current_timestamp FROM {view}")
            finally:
                con.unregister(view)
        return len(rows)
