"""The one place that opens DuckDB connections.

DuckDB lets one process write a file. A second process gets an immediate lock error, which we
turn into one line naming the holder; we never wait on a lock.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from featurescribe.errors import DatabaseLocked, FeaturescribeError, NoDatabase, SchemaTooNew
from featurescribe.store.schema import SCHEMA_VERSION, current_version, migrate

DEFAULT_DB = "featurescribe.duckdb"

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<prog>\S+)(?: \(PID (?P<pid>\d+)\))?")


def database_exists(path: str | os.PathLike) -> bool:
    return Path(path).is_file()


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


def _connect(path: str, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(path, read_only=read_only)
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            raise DatabaseLocked(_lock_message(path, err)) from None
        raise FeaturescribeError(f"cannot open database {path}: {str(err).splitlines()[0]}") from None
    except duckdb.Error as err:
        raise FeaturescribeError(f"cannot open database {path}: {str(err).splitlines()[0]}") from None


def open_db(
    path: str | os.PathLike = DEFAULT_DB,
    *,
    read_only: bool = False,
    create: bool = True,
) -> duckdb.DuckDBPyConnection:
    """Open a database, creating it (when `create`) and upgrading its schema.

    `read_only` opens without taking the write lock; an older schema is upgraded first through a
    short writable connection. A database written by a newer featurescribe is refused.
    """
    path = str(path)
    if path != ":memory:" and not database_exists(path):
        if not create:
            raise NoDatabase(
                f"no database at {path} (create one with: featurescribe init --db {path})"
            )
        parent = Path(path).parent
        if not parent.exists():
            raise FeaturescribeError(f"cannot create database {path}: folder {parent} does not exist")

    con = _connect(path, read_only)
    try:
        version = current_version(con)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database {path} has schema version {version}, newer than this featurescribe "
                f"understands ({SCHEMA_VERSION}); upgrade featurescribe"
            )
        if version < SCHEMA_VERSION:
            if read_only:
                con.close()
                rw = _connect(path, False)
                try:
                    migrate(rw)
                finally:
                    rw.close()
                con = _connect(path, True)
            else:
                migrate(con)
    except BaseException:
        con.close()
        raise
    return con
