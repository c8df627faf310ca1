"""`transaction(con)`: the one way the store groups writes.

    with transaction(con):
        con.execute("INSERT ...")
        con.execute("UPDATE ...")

Committed when the block ends, rolled back on any exception (KeyboardInterrupt included), and the
exception goes on. A rollback that fails itself (the connection is gone) does not hide the first
error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def transaction(con) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except Exception:
            pass
        raise
    con.execute("COMMIT")
