"""`MemoryCallStore`: the ledger and response cache of LLM calls, held in memory.

Work that runs away from the database's writer (a Dask worker of the label flow, which must not
open the database) hands its LLM clients one of these: cache look-ups answer from the entries it
was given (`cache`, e.g. from `llm_calls.load_cache`) and from its own new answers; ledger rows
and new cache entries stay in memory. The store pickles, travels back with the chunk's results
(`outgoing()` leaves the given cache behind), and the writer writes it with `flush_to(con)`
inside its own transaction.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict

from featurescribe.store.llm_calls import STATUSES, CallRow, write_calls


class MemoryCallStore:
    """The CallStore interface (record, get_cached, put_cached, flush, close) without a database."""

    def __init__(self, cache: dict[str, dict] | None = None):
        self._lock = threading.Lock()
        self._rows: list[CallRow] = []
        self._known: dict[str, dict] = dict(cache or {})  # key -> response, given or written
        self._new: dict[str, tuple[str, str, str]] = {}  # key -> (backend, model, response JSON)

    def __getstate__(self) -> dict:
        with self._lock:
            return {"rows": list(self._rows), "known": dict(self._known), "new": dict(self._new)}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self._rows, self._known, self._new = state["rows"], state["known"], state["new"]

    # ------------------------------------------------------------------ the client's side
    def record(self, row: CallRow) -> None:
        if row.status not in STATUSES:
            raise ValueError(f"unknown ledger status {row.status!r}")
        with self._lock:
            self._rows.append(row)

    def get_cached(self, key: str) -> dict | None:
        with self._lock:
            if key in self._new:
                return json.loads(self._new[key][2])
            return self._known.get(key)

    def put_cached(self, key: str, backend: str, model: str, response: dict) -> None:
        with self._lock:
            self._new[key] = (backend, model, json.dumps(response))

    def pending_rows(self) -> list[CallRow]:
        with self._lock:
            return list(self._rows)

    def rows(self, run_id: str | None = None) -> list[dict]:
        with self._lock:
            return [asdict(r) for r in self._rows if run_id is None or r.run_id == run_id]

    def spend_usd(self, run_id: str | None = None) -> float:
        return float(sum(r["cost_usd"] for r in self.rows(run_id)))

    def flush(self) -> None:  # nothing to write by itself: the writer calls flush_to
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
        """Write the rows and new cache entries with `con` (in the caller's transaction) and
        forget them; returns the number of ledger rows written. On failure they are kept."""
        with self._lock:
            rows, self._rows = self._rows, []
            new, self._new = self._new, {}
        try:
            write_calls(con, rows, new)
        except BaseException:
            with self._lock:
                self._rows = rows + self._rows
                new.update(self._new)
                self._new = new
            raise
        with self._lock:
            for k, (_, _, j) in new.items():
                self._known[k] = json.loads(j)
        return len(rows)
