"""The `llm_calls` ledger and the `llm_cache` response cache: the SQL of the LLM layer.

`CallStore` is what an LLM client is handed. Ledger rows and cache entries are buffered in
memory and written in batches (a single-row INSERT costs milliseconds in DuckDB, which would cap
a run at a few hundred calls a second); `flush()` writes them, and happens by itself every
`flush_rows` rows or `flush_s` seconds, and on `close()`. Cache look-ups see unflushed entries.

It works on its own cursor of the connection it is given (a DuckDB cursor is a separate
connection to the same database), guarded by a lock, so clients on other threads may share it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from featurescribe.store.bulk import insert_arrow

STATUSES = ("ok", "error", "parse_error", "cached", "budget")


@dataclass
class CallRow:
    """One row of `llm_calls`: one attempt that reached (or would have reached) a provider."""

    backend: str
    model: str
    prompt_hash: str
    status: str  # ok | error | parse_error | cached | budget
    purpose: str | None = None
    run_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float | None = None
    error: str | None = None
    attempt: int = 1
    cached: bool = False
    batch_id: str | None = None
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now())


_LEDGER_COLUMNS = [
    "call_id", "run_id", "backend", "model", "purpose", "prompt_hash", "input_tokens",
    "output_tokens", "cost_usd", "latency_s", "status", "error", "created_at", "cached",
    "attempt", "batch_id",
]


class CallStore:
    """Ledger rows and cached responses of LLM calls, in one database."""

    def __init__(self, con, *, flush_rows: int = 128, flush_s: float = 1.0):
        self._con = con.cursor()
        self._lock = threading.RLock()
        self._rows: list[CallRow] = []
        self._cache_pending: dict[str, tuple[str, str, str]] = {}  # key -> (backend, model, json)
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self._last_flush = time.monotonic()
        self._closed = False

    # ------------------------------------------------------------------ ledger
    def record(self, row: CallRow) -> None:
        if row.status not in STATUSES:
            raise ValueError(f"unknown ledger status {row.status!r}")
        with self._lock:
            self._rows.append(row)
            self._maybe_flush()

    def pending_rows(self) -> list[CallRow]:
        with self._lock:
            return list(self._rows)

    # ------------------------------------------------------------------ cache
    def get_cached(self, key: str) -> dict | None:
        """The cached response under `key` (a dict), or None."""
        with self._lock:
            pending = self._cache_pending.get(key)
            if pending is not None:
                return json.loads(pending[2])
            row = self._con.execute(
                "SELECT response FROM llm_cache WHERE cache_key = ?", [key]
            ).fetchone()
        if row is None:
            return None
        value = row[0]
        return json.loads(value) if isinstance(value, str) else value

    def put_cached(self, key: str, backend: str, model: str, response: dict) -> None:
        with self._lock:
            self._cache_pending[key] = (backend, model, json.dumps(response))
            self._maybe_flush()

    # ------------------------------------------------------------------ writing
    def _maybe_flush(self) -> None:
        n = len(self._rows) + len(self._cache_pending)
        if n >= self.flush_rows or (n and time.monotonic() - self._last_flush >= self.flush_s):
            self.flush()

    def flush(self) -> None:
        """Write the buffered ledger rows and cache entries."""
        with self._lock:
            rows, self._rows = self._rows, []
            cache, self._cache_pending = self._cache_pending, {}
            self._last_flush = time.monotonic()
            if not rows and not cache:
                return
            try:
                self._con.execute("BEGIN TRANSACTION")
                if rows:
                    cols = {c: [getattr(r, c) for r in rows] for c in _LEDGER_COLUMNS}
                    insert_arrow(self._con, "llm_calls", _arrow(cols))
                if cache:
                    self._con.executemany(
                        "INSERT INTO llm_cache (cache_key, backend, model, response, created_at) "
                        "VALUES (?, ?, ?, ?, current_timestamp) ON CONFLICT (cache_key) DO UPDATE "
                        "SET response = excluded.response, created_at = excluded.created_at",
                        [[k, b, m, j] for k, (b, m, j) in cache.items()],
                    )
                self._con.execute("COMMIT")
            except BaseException:
                try:
                    self._con.execute("ROLLBACK")
                except Exception:
                    pass
                # keep what could not be written, so a later flush tries again
                self._rows = rows + self._rows
                cache.update(self._cache_pending)
                self._cache_pending = cache
                raise

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            self._con.close()

    def __enter__(self) -> "CallStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def spend_usd(self, run_id: str | None = None) -> float:
        """Total cost in the ledger (of one run when `run_id`), buffered rows included."""
        self.flush()
        with self._lock:
            if run_id is None:
                row = self._con.execute("SELECT coalesce(sum(cost_usd), 0) FROM llm_calls").fetchone()
            else:
                row = self._con.execute(
                    "SELECT coalesce(sum(cost_usd), 0) FROM llm_calls WHERE run_id = ?", [run_id]
                ).fetchone()
        return float(row[0])

    def rows(self, run_id: str | None = None) -> list[dict]:
        """Ledger rows as dicts, oldest first (flushes first)."""
        self.flush()
        with self._lock:
            q = f"SELECT {', '.join(_LEDGER_COLUMNS)} FROM llm_calls"
            args: list = []
            if run_id is not None:
                q += " WHERE run_id = ?"
                args.append(run_id)
            q += " ORDER BY created_at, call_id"
            cur = self._con.execute(q, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


def _arrow(cols: dict):
    import pyarrow as pa

    types = {
        "call_id": pa.string(), "run_id": pa.string(), "backend": pa.string(), "model": pa.string(),
        "purpose": pa.string(), "prompt_hash": pa.string(), "input_tokens": pa.int32(),
        "output_tokens": pa.int32(), "cost_usd": pa.float64(), "latency_s": pa.float64(),
        "status": pa.string(), "error": pa.string(), "created_at": pa.timestamp("us"),
        "cached": pa.bool_(), "attempt": pa.int32(), "batch_id": pa.string(),
    }
    return pa.table({c: pa.array(v, type=types[c]) for c, v in cols.items()})


def row_dict(row: CallRow) -> dict:
    return asdict(row)
