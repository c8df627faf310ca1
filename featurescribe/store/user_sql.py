"""A user's own SQL, for `featurescribe sql` and the Python handle's `sql()`.

A script of several statements gives the last one's result. Writable, it runs as one transaction
unless it has its own BEGIN/COMMIT (DuckDB commits each statement of a script by itself, so one that
fails would keep the changes of those before it); a script that ends inside its own transaction is
refused, where DuckDB would roll it back at closing without a word. The query runs in a thread, so
Ctrl-C or SIGTERM interrupts it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import duckdb

from featurescribe.errors import BadOption, SQLFailed, damaged_database, disk_full
from featurescribe.store.sql_errors import sql_error_line

T = TypeVar("T")

Fetch = Callable[[duckdb.DuckDBPyConnection, str], Any]  # runs the query, returns its result or None

CLI_READ_ONLY_HINT = "sql opens the database read-only: add --write to change it"
API_READ_ONLY_HINT = "the handle is read-only: open it with featurescribe.open(path, read_only=False) to change it"


def columns_and_rows(con: duckdb.DuckDBPyConnection, query: str) -> tuple[list[str], list[tuple]] | None:
    cur = con.execute(query)
    if cur is None or cur.description is None:
        return None
    return unique_names([d[0] for d in cur.description]), cur.fetchall()


def unique_names(names: list[str]) -> list[str]:
    """`names` with each repeat renamed as DuckDB names them for pandas (x, x_1, x_2, skipping a
    name already taken): a result read by name (JSON rows, dicts) would lose all but one of them."""
    taken = set(names)
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            k = 1
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
            taken.add(name)
        seen.add(name)
        out.append(name)
    return out


def run_script(con: duckdb.DuckDBPyConnection, query: str, fetch: Fetch, *, write: bool,
               read_only_hint: str = CLI_READ_ONLY_HINT) -> Any:
    """`fetch(con, query)`'s result for the last statement, run as the module says; SQLFailed with
    DuckDB's first line for SQL it refuses."""
    statements = _statements(con, query)
    if statements == []:
        raise BadOption("no SQL statement in the query: give one, e.g. \"SELECT * FROM labels LIMIT 10\"")
    atomic = write and not any(st.type == duckdb.StatementType.TRANSACTION for st in statements or ())
    if atomic:
        con.execute("BEGIN TRANSACTION")
    try:
        result = _interruptible(con, lambda: _fetch(con, query, fetch, atomic, None if write else read_only_hint))
    except BaseException:
        if atomic:
            _rollback(con)
        raise
    if write and not atomic and _rollback(con):
        raise SQLFailed("SQL error: the query ends inside a transaction (a BEGIN without a COMMIT after it), so "
                        "what it changed since that BEGIN was rolled back: end it with COMMIT")
    return result


def _statements(con: duckdb.DuckDBPyConnection, query: str) -> list | None:
    """The parsed statements ([] for blanks, semicolons or comments); None for a syntax error,
    which running the query reports."""
    try:
        return con.extract_statements(query)
    except duckdb.Error:
        return None


def _fetch(con: duckdb.DuckDBPyConnection, query: str, fetch: Fetch, commit: bool, read_only_hint: str | None) -> Any:
    try:
        result = fetch(con, query)
        if commit:
            con.execute("COMMIT")
        return result
    except duckdb.Error as err:
        full = disk_full(err)
        if full is not None:  # not the SQL's fault: the disk-full line, as every command gives
            raise full from None
        if damaged_database(err, None):  # nor this: the command line names the damaged file
            raise
        raise SQLFailed(sql_error_line(err, query, read_only_hint)) from None


def _interruptible(con: duckdb.DuckDBPyConnection, work: Callable[[], T]) -> T:
    """`work()` in a thread: Python runs a signal handler only in the main thread and only between
    bytecodes, so Ctrl-C or SIGTERM would wait for DuckDB to finish the query (minutes, or never).
    Here the main thread waits, takes the signal, and interrupts the query."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, name="fs-sql", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except BaseException:
        con.interrupt()
        thread.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _rollback(con: duckdb.DuckDBPyConnection) -> bool:
    """Roll back the open transaction; False when none was open."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:  # none open: the failed statement may have ended it already
        return False
    return True
