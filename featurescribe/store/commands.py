"""`featurescribe init` and `featurescribe sql`."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import unicodedata
from typing import Any

from featurescribe.store.connection import DEFAULT_DB, checkpoint, database_exists, open_db
from featurescribe.store.schema import SCHEMA_VERSION
from featurescribe.store.user_sql import columns_and_rows, run_script


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file to create (default: {DEFAULT_DB})")


def run_init(args: argparse.Namespace) -> int:
    existed = database_exists(args.db)
    con = open_db(args.db, create=True)
    checkpoint(con, args.db)  # an upgraded file too: 'ready' only once the schema is out of the .wal
    con.close()
    # an existing file is brought up to the current schema, or left as it is when it already is
    state = f"ready at schema version {SCHEMA_VERSION}" if existed else f"created (schema version {SCHEMA_VERSION})"
    print(f"{args.db}: {state}")
    return 0


def add_sql_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="the SQL to run, e.g. \"SELECT * FROM labels LIMIT 10\"")
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--write", action="store_true",
                   help="open the database writable (default: read-only)")


def run_sql(args: argparse.Namespace) -> int:
    con = open_db(args.db, read_only=not args.write, create=False)
    try:
        if not sys.stdout.isatty():  # DuckDB draws its progress bar on stdout, into the csv or json
            con.execute("SET enable_progress_bar_print = false")
        result = run_script(con, args.query, columns_and_rows, write=args.write)
    finally:
        con.close()
    if result is not None:
        write_rows(*result, args.format, sys.stdout)
    return 0


def _plain(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _cell(v: Any, width: int = 60) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        text = f"{v:.4g}"
    else:
        text = str(v)
    text = "".join(_escaped(ch) for ch in text)
    return text if display_width(text) <= width else _cut(text, width - 1) + "…"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    """A control character as its escape (a tab, a carriage return or an ANSI escape would move
    the cursor or recolour the terminal); any other character as it is."""
    if unicodedata.category(ch) != "Cc":
        return ch
    return _ESCAPES.get(ch) or ascii(ch)[1:-1]


def _char_cells(ch: str) -> int:
    """Terminal cells of one character: 2 for East Asian wide and fullwidth ones (CJK, most emoji),
    0 for combining marks and format characters (accents, variation selectors, joiners)."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    return sum(_char_cells(ch) for ch in text)


def _cut(text: str, width: int) -> str:
    """The longest start of `text` that fits in `width` cells."""
    used = 0
    for i, ch in enumerate(text):
        used += _char_cells(ch)
        if used > width:
            return text[:i]
    return text


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def write_rows(columns: list[str], rows: list[tuple], fmt: str, out) -> None:
    if fmt == "csv":
        # one column: nothing to separate, so a value with commas (string_agg) is written as it
        # is and scripts can use it directly; quotes and line breaks still get CSV quoting
        if len(columns) == 1 and not any(
            isinstance(v, str) and any(ch in v for ch in '"\n\r') for v in [columns[0]] + [r[0] for r in rows]
        ):
            out.write(columns[0] + "\n")
            for r in rows:
                out.write(("" if r[0] is None else str(r[0])) + "\n")
            return
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
    elif fmt == "json":
        json.dump([{c: _plain(v) for c, v in zip(columns, r)} for r in rows], out, indent=1)
        out.write("\n")
    else:
        cells = [[_cell(v) for v in r] for r in rows]
        widths = [max([display_width(c)] + [display_width(r[i]) for r in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(_pad(c, w) for c, w in zip(columns, widths)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(_pad(v, w) for v, w in zip(r, widths)).rstrip() + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")
