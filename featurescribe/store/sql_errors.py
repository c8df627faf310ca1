"""One line for SQL that DuckDB refuses, with a hint where featurescribe's own layout is the cause."""

from __future__ import annotations

import re

import duckdb

from featurescribe.store.activation_store import KEYS_TABLE, ROWS_TABLE, VIEW

_WRITE_TARGET = re.compile(r'\b(?:delete\s+from|update|insert\s+(?:or\s+\w+\s+)?into|truncate(?:\s+table)?)\s+"?(\w+)"?',
                           re.IGNORECASE)
_VIEW_REFUSALS = ("Can only delete from base table", "Can only update base table", "is not an table")

_VIEW_HINTS = {
    VIEW: (f"{VIEW} is a view over {ROWS_TABLE}, whose rows carry an integer source_key that {KEYS_TABLE} "
           f"maps to the source_id: change {ROWS_TABLE}, e.g. DELETE FROM {ROWS_TABLE} WHERE source_key = "
           f"(SELECT source_key FROM {KEYS_TABLE} WHERE source_id = '6-mlp'); "
           "`harvest --overwrite` replaces a source whole"),
    "labels": "labels is a view of the best-scored explanation per feature: change explanations or scores",
}


def sql_error_line(err: duckdb.Error, query: str, read_only_hint: str | None = None) -> str:
    """'SQL error: <DuckDB's first line>', plus what to do when the cause is ours to explain
    (`read_only_hint`: how to open the database writable, for a connection that is not)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if read_only_hint and "read-only" in first:
        first += f" ({read_only_hint})"
    elif any(refusal in first for refusal in _VIEW_REFUSALS):
        first += f" ({_view_hint(query)})"
    return f"SQL error: {first}"


def _view_hint(query: str) -> str:
    target = _WRITE_TARGET.search(query)
    name = target.group(1).lower() if target else ""
    return _VIEW_HINTS.get(name, f"{name or 'that'} is a view: change the tables it reads")
