"""Query results for Python: an Arrow table that converts to pandas or polars on request.

`Table` wraps a `pyarrow.Table` (pyarrow is a dependency); pandas and polars are imported only
when asked for, with a clear `MissingDependency` when they are not installed. Every read of the
database handle takes `format=`: None gives the `Table` (which shows itself as text, or as HTML in
Jupyter), "arrow", "pandas" or "polars" give that object directly.
"""

from __future__ import annotations

import html
import importlib
import io
from typing import Any, Iterator

import pyarrow as pa

from featurescribe.errors import BadOption, MissingDependency

FORMATS = ("arrow", "pandas", "polars")
TEXT_ROWS = 20  # rows a Table's text and HTML views show


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependency(f"this needs {name}, which is not installed: pip install {name}") from None


class Table:
    """Rows of a query: `to_arrow()`, `to_pandas()`, `to_polars()`, `to_dicts()`, `len()`, iteration."""

    def __init__(self, arrow: pa.Table):
        self._arrow = arrow

    def to_arrow(self) -> pa.Table:
        return self._arrow

    def to_pandas(self) -> Any:
        _module("pandas")
        return self._arrow.to_pandas()

    def to_polars(self) -> Any:
        return _module("polars").from_arrow(self._arrow)

    def to_dicts(self) -> list[dict[str, Any]]:
        return self._arrow.to_pylist()

    @property
    def columns(self) -> list[str]:
        return list(self._arrow.column_names)

    def __len__(self) -> int:
        return self._arrow.num_rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.to_dicts())

    def __repr__(self) -> str:
        from featurescribe.store.commands import write_rows

        out = io.StringIO()
        rows = self._arrow.slice(0, TEXT_ROWS).to_pylist()
        write_rows(self.columns, [tuple(r.values()) for r in rows], "table", out)
        more = len(self) - len(rows)
        return out.getvalue().rstrip("\n") + (f"\n... {more} more rows" if more > 0 else "")

    def _repr_html_(self) -> str:
        rows = self._arrow.slice(0, TEXT_ROWS).to_pylist()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_short(v))}</td>" for v in r.values()) + "</tr>"
                       for r in rows)
        more = len(self) - len(rows)
        return (f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                + (f"<p>... {more} more rows</p>" if more > 0 else ""))


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = "NULL" if v is None else str(v)
    return text if len(text) <= 80 else text[:79] + "…"


def as_format(table: Table, format: str | None) -> Any:
    """`table` itself (format None), or its Arrow table, pandas or polars DataFrame."""
    if format is None:
        return table
    if format not in FORMATS:
        raise BadOption(f"unknown format {format!r}: use {', '.join(FORMATS)} (or None for a Table)")
    return getattr(table, f"to_{format}")()
