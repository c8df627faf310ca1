"""The database handle of the Python API, `featurescribe.open(path)`, and the records it returns.

The handle holds a path, not a connection: every call opens the file (read-only unless
`read_only=False`), reads, and closes it before it returns, so a long harvest or label run in
another process can take the write lock between calls.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from featurescribe.errors import BadOption
from featurescribe.frames import Table, as_format
from featurescribe.options import checked_value
from featurescribe.store.export_queries import FeatureBundle


class Labels(Table):
    """The best label of each feature (the `labels` view); shows as a card in Jupyter."""

    def _repr_html_(self) -> str:
        from featurescribe.export.cards import labels_card

        return labels_card(self.to_dicts())


class SearchResults(Table):
    """Features whose best label is nearest in meaning to a query, nearest first."""

    def _repr_html_(self) -> str:
        from featurescribe.export.cards import search_card

        return search_card(self.to_dicts())


@dataclass(repr=False)
class Feature(FeatureBundle):
    """One feature: `stats` (its `features` row), `explanations` (each with every score and its
    baselines; the best label first), `examples` (its windows: tokens with per-token `acts`;
    `windows("top")` those of one kind) and `histogram` (of its activations)."""

    def _entry(self, n_windows: int = 8) -> dict[str, Any]:
        """The entry the HTML report embeds for this feature."""
        from featurescribe.export.report import report_entry

        return report_entry(self, n_windows, max(2, n_windows // 2))

    @property
    def best(self) -> dict[str, Any] | None:
        """The best label: text, explainer, score, scorer, simulator, baselines and lift (None: none)."""
        return self._entry()["best"]

    def _repr_html_(self) -> str:
        from featurescribe.export.cards import feature_card

        return feature_card(self._entry())

    def __repr__(self) -> str:
        best = self.best
        label = f"{best['text']!r} (score {best['score']:.3f})" if best and best["score"] is not None else "unlabelled"
        return (f"<Feature {self.source_id}/{self.feature_id}: {label}; active on {self.stats.get('n_active', 0)} "
                f"tokens, max {self.stats.get('max_act')}; {len(self.explanations)} explanation(s), "
                f"{len(self.examples)} window(s)>")


def _source_id(source: Any, optional: bool = False) -> Any:
    if (source is None and optional) or isinstance(source, str):
        return source
    raise BadOption(f"source must be a source id such as '6-mlp', not {source!r}")


class Database:
    """A featurescribe database file: read its labels, features and tables."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = True):
        self.path = checked_value("open() path", path, str)
        self.read_only = read_only
        with self._connect():  # a missing or unreadable file is an error now, not at the first read
            pass

    def __repr__(self) -> str:
        return f"featurescribe.Database({self.path!r}{'' if self.read_only else ', read_only=False'})"

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        from featurescribe.errors import damaged_database
        from featurescribe.store.connection import open_db

        con = open_db(self.path, read_only=self.read_only, create=False)
        try:
            yield con
        except Exception as err:  # DuckDB finds a damaged block only when a read reaches it
            damaged = damaged_database(err, self.path)
            if damaged is None:
                raise
            raise damaged from None
        finally:
            con.close()

    def sources(self, *, format: str | None = None) -> Any:
        """Every source: its id, model, hook, layer, site, kind, width, tokens harvested."""
        from featurescribe.store.handle_queries import sources_table

        with self._connect() as con:
            return as_format(Table(sources_table(con)), format)

    def labels(self, source: str | None = None, *, format: str | None = None) -> Any:
        """The best-scored explanation of every feature (the `labels` view), one source or all."""
        from featurescribe.store.handle_queries import labels_table

        with self._connect() as con:
            return as_format(Labels(labels_table(con, _source_id(source, optional=True))), format)

    def features(self, source: str, *, format: str | None = None) -> Any:
        """Every feature of a source: statistics and best label (empty where unlabelled)."""
        from featurescribe.store.handle_queries import features_table

        with self._connect() as con:
            return as_format(Table(features_table(con, _source_id(source))), format)

    def feature(self, source: str, feature_id: int, *, windows: int = 8) -> Feature:
        """One feature with everything known about it; `windows`: top windows to read when no
        label run sampled any."""
        from featurescribe.store.handle_queries import feature_detail

        if isinstance(feature_id, bool) or not isinstance(feature_id, int):
            raise BadOption(f"feature_id must be an integer, not {feature_id!r}")
        windows = checked_value("feature() windows=", windows, int)
        with self._connect() as con:
            return Feature(**feature_detail(con, _source_id(source), feature_id, windows))

    def search(self, text: str, *, k: int = 10, source: str | None = None, min_score: float | None = None,
               embedder: str | None = None, format: str | None = None) -> Any:
        """The `k` features whose best label is closest in meaning to `text` (needs label embeddings:
        a label run makes them, or `featurescribe embed`)."""
        from featurescribe.semantic.search import search

        text = checked_value("search() text", text, str)
        k = checked_value("search() k=", k, int)
        min_score = checked_value("search() min_score=", min_score, float | None)
        with self._connect() as con:
            hits = search(con, text, embedder=embedder, source_id=_source_id(source, optional=True), k=k, min_score=min_score,
                          db_label=f"database {self.path}", db_path=str(self.path))
        return as_format(SearchResults(_hits_table(hits)), format)

    def sql(self, query: str, *, format: str | None = None) -> Any:
        """Run SQL (read-only unless the handle was opened with `read_only=False`): the last
        statement's result; a writable script changes all or nothing, as `featurescribe sql --write`."""
        from featurescribe.store.handle_queries import user_table

        with self._connect() as con:
            return as_format(Table(user_table(con, query, write=not self.read_only)), format)


def _hits_table(hits: list) -> Any:
    import pyarrow as pa

    from featurescribe.semantic.search import SearchHit

    names = list(SearchHit.__dataclass_fields__)
    return pa.Table.from_pylist([h.as_dict() for h in hits]) if hits else pa.table({n: [] for n in names})
