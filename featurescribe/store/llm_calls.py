"""The `llm_calls` ledger and the `llm_cache` response cache: the SQL of the LLM layer.

`CallStore` is what an LLM client is handed. Ledger rows and cache entries are buffered in
memory and written in batches by a background thread (a single-row INSERT costs milliseconds in
DuckDB, and a batch written on the event loop would stall every call in flight): every
`flush_rows` rows or `flush_s` seconds, on `flush()`, and on `close()`. Cache look-ups see
entries not yet written. Reading the ledger (`rows`, `spend_usd`) flushes first.

It is given an open connection (it then works on cursors of its own, one per write or read, so
clients on other threads and the caller's own writes do not get in each other's way) or a
`connection.Database`, which it opens for each write and each read and closes again, so that
other processes (readers, another run) can use the file between them.

A cache look-up that misses costs no query: on its first look-up a store reads which keys the
database holds (one query; 8 bytes a key), and every write of cache entries in this process
(`write_calls`, `memory_calls.MemoryCallStore.flush_to`) adds its keys to the stores open on that
file; a key the index does not know is taken as absent, a key it knows is read with one query.
An entry another process writes after the first look-up is not seen: at worst a call is made
again (two label runs on different sources rarely share a prompt), never a wrong answer.
(A point query on the event loop costs about a millisecond, a third of a whole request.)
In-memory databases are always queried.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
import weakref
from dataclasses import dataclass, field

from featurescribe.statuses import CallStatus
from featurescribe.store.bulk import insert_arrow
from featurescribe.store.capabilities import read_capabilities, write_capabilities
from featurescribe.store.connection import Database, session
from featurescribe.store.transaction import transaction

STATUSES = tuple(CallStatus)


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
    cached_input_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it (Anthropic)
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
    "attempt", "batch_id", "cached_input_tokens", "cache_write_tokens",
]


class CallStore:
    """Ledger rows and cached responses of LLM calls, in one database."""

    def __init__(self, con, *, flush_rows: int = 128, flush_s: float = 1.0, background: bool = True):
        self._target = con  # an open connection, or a Database opened per write and read
        self._lock = threading.Lock()  # the buffers
        self._db_lock = threading.RLock()  # one write at a time
        self._rows: list[CallRow] = []
        self._cache_pending: dict[str, tuple[str, str, str]] = {}  # key -> (backend, model, json)
        self._cache_writing: dict[str, tuple[str, str, str]] = {}
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self._closed = False
        self._index = _KeyIndex.open_for(con)  # None: an in-memory database, always queried
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            ref = weakref.ref(self)
            self._thread = threading.Thread(target=_writer_loop, args=(ref, self._wake), daemon=True,
                                            name="featurescribe-ledger")
            self._thread.start()

    # ------------------------------------------------------------------ ledger
    def record(self, row: CallRow) -> None:
        if row.status not in STATUSES:
            raise ValueError(f"unknown ledger status {row.status!r}")
        with self._lock:
            self._rows.append(row)
            n = len(self._rows) + len(self._cache_pending)
        self._nudge(n)

    def pending_rows(self) -> list[CallRow]:
        with self._lock:
            return list(self._rows)

    # ------------------------------------------------------------------ cache
    def get_cached(self, key: str) -> dict | None:
        """The cached response under `key` (a dict), or None."""
        with self._lock:
            pending = self._cache_pending.get(key) or self._cache_writing.get(key)
        if pending is not None:
            return json.loads(pending[2])
        if self._index is not None and not self._index.may_hold(key, self._load_keys):
            return None
        with session(self._target) as con:
            row = con.execute("SELECT response FROM llm_cache WHERE cache_key = ?", [key]).fetchone()
        if row is None:
            return None
        value = row[0]
        return json.loads(value) if isinstance(value, str) else value

    def _load_keys(self) -> list[str]:
        with session(self._target) as con:
            return [k for (k,) in con.execute("SELECT cache_key FROM llm_cache").fetchall()]

    def put_cached(self, key: str, backend: str, model: str, response: dict) -> None:
        with self._lock:
            self._cache_pending[key] = (backend, model, json.dumps(response))
            n = len(self._rows) + len(self._cache_pending)
        self._nudge(n)

    # ------------------------------------------------------------------ writing
    def _nudge(self, n: int) -> None:
        if n >= self.flush_rows:
            if self._thread is not None:
                self._wake.set()
            else:
                self.flush()

    def _background_flush(self) -> None:
        try:
            self.flush()
        except BaseException as err:  # surfaced by the next flush() from the caller
            self._error = err

    def flush(self) -> None:
        """Write the buffered ledger rows and cache entries (waits for a write in progress)."""
        with self._db_lock:
            err, self._error = self._error, None
            with self._lock:
                rows, self._rows = self._rows, []
                cache, self._cache_pending = self._cache_pending, {}
                self._cache_writing = cache
            try:
                if rows or cache:
                    self._write(rows, cache)
            except BaseException:
                with self._lock:  # keep what could not be written, so a later flush tries again
                    self._rows = rows + self._rows
                    cache.update(self._cache_pending)
                    self._cache_pending = cache
                    self._cache_writing = {}
                raise
            with self._lock:
                self._cache_writing = {}
            if err is not None:
                raise err

    def _write(self, rows: list[CallRow], cache: dict) -> None:
        with session(self._target) as con, transaction(con):
            write_calls(con, rows, cache)

    def close(self) -> None:
        """Stop the writer and write what is buffered."""
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def __enter__(self) -> "CallStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ server capabilities
    def endpoint_capabilities(self, base_url: str, model: str) -> dict | None:
        """What an earlier run learnt `model` at `base_url` takes (llm/negotiation.py), or None."""
        with session(self._target) as con:
            return read_capabilities(con, base_url, model)

    def remember_capabilities(self, base_url: str, model: str, record: dict) -> None:
        with self._db_lock, session(self._target) as con, transaction(con):
            write_capabilities(con, base_url, model, record)

    # ------------------------------------------------------------------ reading
    def spend_usd(self, run_id: str | None = None) -> float:
        """Total cost in the ledger (of one run when `run_id`), buffered rows included."""
        self.flush()
        q = "SELECT coalesce(sum(cost_usd), 0) FROM llm_calls"
        args: list = []
        if run_id is not None:
            q += " WHERE run_id = ?"
            args.append(run_id)
        with session(self._target) as con:
            row = con.execute(q, args).fetchone()
        return float(row[0])

    def rows(self, run_id: str | None = None) -> list[dict]:
        """Ledger rows as dicts, oldest first (flushes first)."""
        self.flush()
        q = f"SELECT {', '.join(_LEDGER_COLUMNS)} FROM llm_calls"
        args: list = []
        if run_id is not None:
            q += " WHERE run_id = ?"
            args.append(run_id)
        q += " ORDER BY created_at, call_id"
        with session(self._target) as con:
            cur = con.execute(q, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


class _HashSet:
    """A growing set of int64 hashes: a small Python set, folded into a sorted array (8 bytes a
    key) when it grows past `fold`."""

    def __init__(self, fold: int = 65536):
        self._lock = threading.Lock()
        self._recent: set[int] = set()
        self._sorted = None  # numpy int64, sorted
        self._fold = fold

    def update(self, hashes) -> None:
        with self._lock:
            self._recent.update(hashes)
            if len(self._recent) >= self._fold:
                import numpy as np

                parts = [np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))]
                if self._sorted is not None:
                    parts.append(self._sorted)
                self._sorted = np.unique(np.concatenate(parts))
                self._recent = set()

    def __contains__(self, h: int) -> bool:
        with self._lock:
            if h in self._recent:
                return True
            arr = self._sorted
        if arr is None:
            return False
        i = int(arr.searchsorted(h))
        return i < len(arr) and int(arr[i]) == h


class _KeyIndex:
    """The cache keys a database file holds, as in-process hashes (see the module docstring).

    `may_hold(key)` is False only when the key is certainly not in the database; True means
    "query it": the keys read from the database on the first look-up, plus every key this
    process wrote to that file (noted before the write, so no write can slip between).
    """

    _WRITTEN: "dict[str, _HashSet]" = {}  # database file -> keys this process wrote to it
    _WRITTEN_LOCK = threading.Lock()

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._loaded = None  # the keys read from the database, as a _HashSet
        self._written = self._written_to(path)

    @classmethod
    def _written_to(cls, path: str) -> "_HashSet":
        with cls._WRITTEN_LOCK:
            hs = cls._WRITTEN.get(path)
            if hs is None:
                hs = cls._WRITTEN[path] = _HashSet()
            return hs

    @classmethod
    def open_for(cls, con) -> "_KeyIndex | None":
        path = os.path.realpath(con.path) if isinstance(con, Database) else _db_path(con)
        return cls(path) if path else None

    def may_hold(self, key: str, load) -> bool:
        h = hash(key)
        if h in self._written:
            return True
        with self._lock:
            if self._loaded is None:
                hs = _HashSet(fold=0)
                hs.update(hash(k) for k in load())
                self._loaded = hs
        return h in self._loaded

    @classmethod
    def note_written(cls, con, keys) -> None:
        """`keys` are about to be written to the database of `con` (call before the insert)."""
        path = _db_path(con)
        if path:
            cls._written_to(path).update({hash(k) for k in keys})


def _db_path(con) -> str | None:
    """The file of `con`'s current database (None: in memory)."""
    try:
        rows = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    except Exception:  # an old DuckDB, or a closed connection: no index
        return None
    return os.path.realpath(rows[0][0]) if rows and rows[0][0] else None


def write_calls(con, rows: list[CallRow], cache: dict[str, tuple[str, str, str]]) -> None:
    """Insert ledger rows and upsert cache entries (key -> (backend, model, response JSON)) with
    `con`, inside whatever transaction the caller has open."""
    if rows:
        cols = {c: [getattr(r, c) for r in rows] for c in _LEDGER_COLUMNS}
        insert_arrow(con, "llm_calls", _arrow(cols))
    if cache:
        import pyarrow as pa

        _KeyIndex.note_written(con, cache)  # before the insert: an index may say "query" too early, never "absent"
        keys = list(cache)
        tbl = pa.table({
            "cache_key": pa.array(keys, type=pa.string()),
            "backend": pa.array([cache[k][0] for k in keys], type=pa.string()),
            "model": pa.array([cache[k][1] for k in keys], type=pa.string()),
            "response": pa.array([cache[k][2] for k in keys], type=pa.string()),
        })
        view = f"_cache_{uuid.uuid4().hex}"
        con.register(view, tbl)
        try:
            con.execute(
                "INSERT OR REPLACE INTO llm_cache (cache_key, backend, model, response, created_at) "
                f"SELECT cache_key, backend, model, response::JSON, current_timestamp FROM {view}"
            )
        finally:
            con.unregister(view)


def load_cache(con, keys: list[str] | None = None, backends: list[str] | None = None) -> dict[str, dict]:
    """Cached responses as {cache_key: response} (all, or those of `keys` / `backends`), to seed
    a MemoryCallStore."""
    q = "SELECT cache_key, response FROM llm_cache"
    args: list = []
    conds = []
    if keys is not None:
        conds.append("cache_key IN (SELECT unnest(?::VARCHAR[]))")
        args.append(list(keys))
    if backends is not None:
        conds.append("backend IN (SELECT unnest(?::VARCHAR[]))")
        args.append(list(backends))
    if conds:
        q += " WHERE " + " AND ".join(conds)
    out = {}
    for k, v in con.execute(q, args).fetchall():
        out[k] = json.loads(v) if isinstance(v, str) else v
    return out


def _writer_loop(ref, wake: threading.Event) -> None:
    """The background writer; it holds the store only weakly, so a dropped store goes away."""
    while True:
        store = ref()
        if store is None or store._stop:
            return
        interval = store.flush_s
        del store
        wake.wait(interval)
        wake.clear()
        store = ref()
        if store is None or store._stop:
            return
        store._background_flush()
        del store


def _arrow(cols: dict):
    import pyarrow as pa

    types = {
        "call_id": pa.string(), "run_id": pa.string(), "backend": pa.string(), "model": pa.string(),
        "purpose": pa.string(), "prompt_hash": pa.string(), "input_tokens": pa.int32(),
        "output_tokens": pa.int32(), "cost_usd": pa.float64(), "latency_s": pa.float64(),
        "status": pa.string(), "error": pa.string(), "created_at": pa.timestamp("us"),
        "cached": pa.bool_(), "attempt": pa.int32(), "batch_id": pa.string(),
        "cached_input_tokens": pa.int64(), "cache_write_tokens": pa.int64(),
    }
    return pa.table({c: pa.array(v, type=types[c]) for c, v in cols.items()})
