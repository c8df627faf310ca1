"""The one place that opens DuckDB connections.

DuckDB lets one process write a file, and a process that writes holds the file exclusively (a
file lock): while it is open for writing no other process can open it, not even to read. So
nothing holds the file longer than one piece of work:

- commands that only read (`sql`, `report`, `export`, `search`, `browse`) open it read-only and
  close it when they have their answer;
- long runs (label, harvest) keep it closed between their writes and open it for one short
  transaction at a time, through a `Database` handle (`with db.connect() as con: ...`).

Opening retries while another process holds the lock, for `lock_timeout()` seconds (5 s unless
`FEATURESCRIBE_LOCK_TIMEOUT` or `--lock-timeout` says otherwise); only when that wait runs out
does it fail, with one line naming the holder. A run already under way waits longer for its own
writes (`run_lock_timeout()`), so a slow reader never ends a run that has hours of work in it.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import duckdb

from featurescribe.errors import (BadOption, DamagedDatabase, DatabaseLocked, DiskFull, FeaturescribeError, NoDatabase,
                                  SchemaTooNew, damaged_database, disk_full)
from featurescribe.store.schema import SCHEMA_VERSION, current_version, migrate

DEFAULT_DB = "featurescribe.duckdb"
LOCK_TIMEOUT_ENV = "FEATURESCRIBE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 5.0
RUN_LOCK_TIMEOUT_S = 120.0  # at least this long for the writes of a run under way

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<prog>\S+)(?: \(PID (?P<pid>\d+)\))?")


def database_exists(path: str | os.PathLike) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long, a loop of links: no database there (open_db says why)
        return False


def parse_lock_timeout(text: str | float | None, what: str = "--lock-timeout") -> float:
    """Seconds to wait for a locked database (>= 0); one clear error for anything else."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FeaturescribeError(f"{what} must be a number of seconds, not {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise FeaturescribeError(f"{what} must be a number of seconds, 0 or more (got {text!r})")
    return value


def lock_timeout() -> float:
    """How long opening waits for a locked database: `FEATURESCRIBE_LOCK_TIMEOUT` (which
    `--lock-timeout` sets), else 5 s."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    return parse_lock_timeout(text, LOCK_TIMEOUT_ENV) if text else DEFAULT_LOCK_TIMEOUT_S


def run_lock_timeout() -> float:
    return max(lock_timeout(), RUN_LOCK_TIMEOUT_S)


def _lock_message(path: str, err: Exception) -> str:
    text = str(err)
    m = _LOCK_HOLDER.search(text)
    if m:
        holder = m.group("prog")
        if m.group("pid"):
            holder += f" (PID {m.group('pid')})"
    else:
        holder = "another process"
    return f"database {path} is locked by {holder}; wait for it to finish or stop it"


def is_lock_error(err: Exception) -> bool:
    return isinstance(err, duckdb.IOException) and "lock" in str(err).lower()


def _connect_once(path: str, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(path, read_only=read_only)
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            raise DatabaseLocked(_lock_message(path, err)) from err
        known = disk_full(err) or damaged_database(err, path)
        if known is not None:
            raise known from None
        raise FeaturescribeError(f"cannot open database {path}: {str(err).splitlines()[0]}") from None
    except duckdb.Error as err:
        raise FeaturescribeError(f"cannot open database {path}: {str(err).splitlines()[0]}") from None


def retry_locked(attempt, timeout: float | None = None):
    """`attempt()` until it does not raise DatabaseLocked or `timeout` seconds (default
    `lock_timeout()`) have passed; then the last DatabaseLocked goes on. Waits grow from 5 ms to
    100 ms, with jitter, so that processes waiting on each other do not retry in step."""
    timeout = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            return attempt()
        except DatabaseLocked as err:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseLocked(str(err)) from None
            time.sleep(min(left, pause * (0.5 + random.random())))
            pause = min(pause * 2, 0.1)


def _connect(path: str, read_only: bool, timeout: float | None = None) -> duckdb.DuckDBPyConnection:
    if path == ":memory:":
        return _connect_once(path, read_only)
    return retry_locked(lambda: _connect_once(path, read_only), timeout)


def open_db(
    path: str | os.PathLike = DEFAULT_DB,
    *,
    read_only: bool = False,
    create: bool = True,
    timeout: float | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open a database, creating it (when `create`) and upgrading its schema.

    `read_only` opens without taking the write lock; an older schema is upgraded first through a
    short writable connection. A database written by a newer featurescribe is refused. A locked
    file is waited for (`timeout` seconds, default `lock_timeout()`). A new file that could not be
    made whole (a full disk) is removed: left behind, every later command would fail on it.
    """
    path = str(path)
    new = _is_new(path, create)
    try:
        con = _connect(path, read_only, timeout)
    except DiskFull:
        if new:
            _remove_unfinished(path)
        raise
    # another process may have made the file between our look and our connect (two harvests of
    # one new path started together): then it is theirs, and not ours to remove on an error
    new = new and _made_here(con)
    try:
        con = _upgraded(con, path, read_only, timeout, adopt=create)
        if new and not read_only:
            checkpoint(con, path)
        return con
    except BaseException:
        if new:  # this process made the file and held it: nobody else can be using it
            _remove_unfinished(path)
        raise


def _made_here(con: duckdb.DuckDBPyConnection) -> bool:
    """A database that holds nothing yet: the one this process's connect just made."""
    try:
        return current_version(con) == 0 and not con.execute("SELECT 1 FROM duckdb_tables() LIMIT 1").fetchall()
    except BaseException:
        con.close()
        raise


def _is_new(path: str, create: bool) -> bool:
    """True for a database file to create; the errors of a path that cannot be one."""
    _check_usable(path)
    if Path(path).is_dir():
        raise BadOption(f"--db {path} is a folder: give a database file, e.g. {Path(path) / DEFAULT_DB}")
    if path.endswith(("/", os.sep)):  # DuckDB would make a file named like the folder
        raise BadOption(f"--db {path} ends in '/', which names a folder: give a database file, "
                        f"e.g. {Path(path) / DEFAULT_DB}")
    if path == ":memory:":
        return False
    if database_exists(path):
        _refuse_sqlite(path)
        return False
    if os.path.exists(path):  # DuckDB would wait forever on a pipe; nor is a device ours to remove
        raise BadOption(f"--db {path} is not a regular file (a pipe, a device or a socket): give a database file")
    if not create:
        raise NoDatabase(f"no database at {path} (create one with: featurescribe init --db {path})")
    parent = Path(path).parent
    if not parent.exists():
        raise FeaturescribeError(f"cannot create database {path}: folder {parent} does not exist")
    return not os.path.exists(path + ".wal")  # a log left by another process is not ours to remove


SQLITE_MAGIC = b"SQLite format 3\x00"


def _refuse_sqlite(path: str) -> None:
    """DuckDB opens a SQLite file through an extension that it downloads when missing: a network
    request, then an error about the download rather than the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError:  # unreadable: DuckDB's opening says why
        return
    if head == SQLITE_MAGIC:
        raise BadOption(f"database {path} is a SQLite file, not a DuckDB database: give a DuckDB file")


def _check_usable(path: str) -> None:
    """One line for a path the system refuses to look up (a name too long, a loop of links)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new file, or DuckDB's own line
        return
    except OSError as err:
        raise BadOption(f"--db {path} cannot be used: {err.strerror}") from None


def _upgraded(con: duckdb.DuckDBPyConnection, path: str, read_only: bool,
              timeout: float | None, adopt: bool = True) -> duckdb.DuckDBPyConnection:
    """`con`, its schema brought up to this version (closed on an error). A DuckDB file without our
    schema gets it only when `adopt` (init, or a command that creates its database) and not read-only."""
    try:
        version = current_version(con)
        if version == 0 and (read_only or not adopt):  # someone else's DuckDB file: keep our tables out
            raise not_featurescribe(path, read_only)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database {path} has schema version {version}, newer than this featurescribe "
                f"understands ({SCHEMA_VERSION}); upgrade featurescribe"
            )
        if version < SCHEMA_VERSION:
            if read_only:
                con.close()
                _upgrade_to_read(path, version, timeout)
                con = _connect(path, True, timeout)
            else:
                migrate(con)
    except BaseException:
        con.close()
        raise
    return con


_OS_REASON = re.compile(r'": (?P<why>[^"]+)$')  # DuckDB's 'Cannot open file "PATH": Read-only file system'


def _upgrade_to_read(path: str, version: int, timeout: float | None) -> None:
    """Migrate an older database through a short writable opening, so that it can be read; one line
    saying why when the file cannot be written (a read-only mount or file)."""
    try:
        rw = _connect(path, False, timeout)
    except (DatabaseLocked, DiskFull, DamagedDatabase):
        raise
    except FeaturescribeError as err:
        reason = _OS_REASON.search(str(err))
        raise FeaturescribeError(
            f"database {path} has schema version {version}, older than this featurescribe reads ({SCHEMA_VERSION}), "
            f"and upgrading it needs it writable: it is not ({reason.group('why') if reason else err}); upgrade it "
            f"once where it can be written, with: featurescribe init --db {path}") from None
    try:
        migrate(rw)
    finally:
        rw.close()


def checkpoint(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Write what is committed into the file itself (closing `con` on an error). DuckDB checkpoints
    when a connection closes but says nothing when that fails: on a full disk a new database's
    schema stayed in its .wal while init said 'created'."""
    try:
        con.execute("CHECKPOINT")
    except duckdb.Error as err:
        con.close()
        full = disk_full(err)
        if full is not None:
            raise full from None
        raise FeaturescribeError(f"cannot write database {path}: {str(err).splitlines()[0]}") from None


def not_featurescribe(path: str, read_only: bool = True) -> BadOption:
    why = "a command that only reads adds none" if read_only else "only init adds them to an existing file"
    return BadOption(f"database {path} is not a featurescribe database (it has no schema_version table); {why}: "
                     f"give another --db, or add the tables with: featurescribe init --db {path}")


def _remove_unfinished(path: str) -> None:
    for leftover in (path, path + ".wal"):
        try:
            os.remove(leftover)
        except FileNotFoundError:
            pass


@dataclass
class Database:
    """A database file that is opened for one short piece of work at a time:

        db = Database("f.duckdb")
        with db.connect() as con:      # opened (waiting on a lock), closed when the block ends
            ...

    The first opening checks and upgrades the schema (`open_db`); later ones only open. Blocks in
    several threads at once share one opening (each gets its own cursor), which is closed, and the
    file unlocked, when the last of them ends. (Opening and closing a file in several threads at
    once is not safe in DuckDB's Python module: a connection can come without its Arrow scans.)
    `lock_timeout`: seconds to wait for another process's lock (None: `lock_timeout()`).
    """

    path: str
    read_only: bool = False
    lock_timeout: float | None = None
    memory_headroom_mb: int | None = None  # each opening's DuckDB memory bound (store/memory.py)
    create: bool = False  # the first opening creates a missing file (as `open_db` does)
    first_lock_timeout: float | None = None  # the first opening's wait for a lock (None: lock_timeout's)
    _checked: bool = field(default=False, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)
    _base: Any = field(default=None, repr=False, compare=False)  # the opening the blocks share
    _users: int = field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = str(self.path)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_base", "_users")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _base=None, _users=0)

    def _open(self) -> duckdb.DuckDBPyConnection:
        if not self._checked:
            first = self.lock_timeout if self.first_lock_timeout is None else self.first_lock_timeout
            con = open_db(self.path, read_only=self.read_only, create=self.create, timeout=first)
            self._checked = True
        else:
            con = _connect(self.path, self.read_only, self.lock_timeout)
        if self.memory_headroom_mb:
            from featurescribe.store.memory import limit_memory

            limit_memory(con, self.memory_headroom_mb)
        return con

    def _acquire(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._base is None:
                self._base = self._open()
            self._users += 1
            try:
                return self._base.cursor()
            except BaseException:
                self._users -= 1
                raise

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                base, self._base = self._base, None
                try:
                    if self.memory_headroom_mb and not self.read_only:
                        from featurescribe.store.memory import lean_checkpoint

                        lean_checkpoint(base, self.memory_headroom_mb)
                finally:
                    base.close()

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._acquire()
        try:
            yield con
        finally:
            con.close()
            self._release()


def attach_read_only(con, path: str, name: str, timeout: float | None = None) -> None:
    """ATTACH the file at `path` read-only to `con` as `name`, waiting on a lock like `open_db`."""
    quoted = path.replace("'", "''")

    def attempt() -> None:
        try:
            con.execute(f"ATTACH '{quoted}' AS {name} (READ_ONLY)")
        except duckdb.Error as err:
            if "lock" in str(err).lower():
                raise DatabaseLocked(_lock_message(path, err)) from err
            raise FeaturescribeError(f"cannot open database {path}: {str(err).splitlines()[0]}") from None

    retry_locked(attempt, timeout)


@contextmanager
def session(target: Any) -> Iterator[Any]:
    """A connection for one piece of work: `target` is a `Database` (opened for the block), a
    path (opened for the block, created and upgraded as `open_db` does), or an open connection
    (a cursor of it for the block, so threads do not share one)."""
    if isinstance(target, Database):
        with target.connect() as con:
            yield con
        return
    if isinstance(target, (str, os.PathLike)):
        con = open_db(target)
    else:
        con = target.cursor()
    try:
        yield con
    finally:
        con.close()
