"""One query on a read-only connection that is closed at once (the tests' way to look at a database)."""

from __future__ import annotations

from featurescribe.store import open_db


def q(db: str, sql: str, params=None) -> list[tuple]:
    con = open_db(db, read_only=True, create=False)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def version1_database(path: str, *statements: str) -> None:
    """A database as schema version 1 wrote it (for the upgrade tests), then `statements` run on it."""
    import duckdb

    from featurescribe.store.schema import MIGRATIONS, VERSION_TABLE

    con = duckdb.connect(path)
    try:
        con.execute(VERSION_TABLE)
        for stmt in (*MIGRATIONS[0], "INSERT INTO schema_version (version) VALUES (1)", *statements):
            con.execute(stmt)
    finally:
        con.close()
