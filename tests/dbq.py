"""One query on a read-only connection that is closed at once (the tests' way to look at a database)."""

from __future__ import annotations

from featurescribe.store import open_db


def q(db: str, sql: str, params=None) -> list[tuple]:
    con = open_db(db, read_only=True, create=False)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()
