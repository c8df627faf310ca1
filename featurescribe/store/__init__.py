"""The DuckDB store: schema, migrations, connections and all SQL of the project."""

from featurescribe.store.connection import open_db, database_exists

__all__ = ["open_db", "database_exists"]
