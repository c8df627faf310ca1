"""The browse app: JSON endpoints over `store/browse_queries.py` and one HTML page.

    GET /                              the page (also /feature/SOURCE/ID: a permalink)
    GET /api/meta                      sources, explainers, embedders
    GET /api/features?...              one page of the feature list (filters, sort, text or
                                       semantic search: mode=semantic&q=...)
    GET /api/feature/SOURCE/ID         a feature: stats, histogram, explanations with scores,
                                       windows, promoted tokens
    GET /api/feature/SOURCE/ID/neighbours   the nearest labels of other features

Each request reads through its own cursor of one in-memory DuckDB to which the file is attached
read-only while requests read it (so a label run or harvest can write between requests); the list
pages read an in-memory table of every feature with its best label, built when the server starts
and rebuilt when the file has changed.
"""

from __future__ import annotations

import math
import threading
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse

from featurescribe.errors import FeaturescribeError
from featurescribe.store import browse_queries as bq
from featurescribe.store.labelling import source_width
from featurescribe.store.windows import feature_windows


def _clean(v: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class BrowseState:
    """The file reader (the database attached only while a request reads it) and the embedder a
    semantic query needs (loaded on first use)."""

    def __init__(self, db_path: str):
        self.db_path = db_path
        self.reader = bq.FileReader(db_path)
        self._ordered: tuple[int, set[str]] = (-1, set())  # (reader generation, sources ordered)
        self._embedders: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def n_features(self) -> int:
        return self.reader.n_features

    def cursor(self):
        """A cursor for one request (a context manager): the file is open while it is."""
        return self.reader.reading()

    def window_tables(self, cur, source_id: str):
        """The prepared sequence tables, with `source_id`'s order made on its first page."""
        with self._lock:
            generation, done = self._ordered
            if generation != self.reader.generation:
                generation, done = self._ordered = (self.reader.generation, set())
            if source_id not in done:
                bq.prepare_sequence_order(cur, source_id)
                done.add(source_id)
        return bq.WINDOW_TABLES

    def embedder(self, spec: str):
        from featurescribe.llm.embeddings import make_embedder

        with self._lock:
            if spec not in self._embedders:
                self._embedders[spec] = make_embedder(spec)
            return self._embedders[spec]

    def embed_query(self, spec: str, text: str):
        from featurescribe.llm.embeddings import LocalEmbedder, embed_sync, make_embedder

        emb = self.embedder(spec)
        if not isinstance(emb, LocalEmbedder):  # a hosted client belongs to one event loop
            emb = make_embedder(spec)
        return embed_sync(emb, [text], purpose="search")[0]

    def close(self) -> None:
        self.reader.close()


def _semantic(state: BrowseState, cur, q: bq.ListQuery, text: str) -> tuple[list[dict], int]:
    from featurescribe.semantic.search import pick_embedder, rank_hits

    if not bq.has_table(cur, "label_embeddings"):
        raise FeaturescribeError("this database has no label embeddings; make them with: featurescribe embed")
    spec = pick_embedder(cur, None)
    hits = rank_hits(cur, spec, state.embed_query(spec, text), k=q.limit, source_id=q.source,
                     min_score=q.min_score)
    rows = [{"source_id": h.source_id, "feature_id": h.feature_id, "explanation": h.explanation,
             "score": h.score, "scorer": h.scorer, "lift": h.lift, "frac_active": h.density,
             "explainer": h.explainer, "similarity": h.similarity} for h in hits]
    return rows, len(rows)


def _neighbours(cur, explanations: list[dict], source_id: str, feature_id: int) -> list[dict]:
    from featurescribe.semantic.search import rank_hits
    from featurescribe.store.embeddings import embedders_present, vector_of

    best = next((e for e in explanations if e["is_best"]), None)
    if best is None or not bq.has_table(cur, "label_embeddings"):
        return []
    present = embedders_present(cur)
    if not present:
        return []
    vec = vector_of(cur, best["explanation_id"], present[0][0])
    if vec is None:
        return []
    hits = rank_hits(cur, present[0][0], vec, k=7)
    return [{"source_id": h.source_id, "feature_id": h.feature_id, "explanation": h.explanation,
             "score": h.score, "similarity": h.similarity}
            for h in hits if (h.source_id, h.feature_id) != (source_id, feature_id)][:6]


def _page() -> str:
    return resources.files("featurescribe.web").joinpath("templates/browse.html").read_text("utf-8")


def _feature_number(text: str) -> int:
    """A feature id from a URL; words (FastAPI's 422 list) become one error a page can show."""
    try:
        return int(text)
    except ValueError:
        raise FeaturescribeError(f"a feature id is a whole number, not {text!r}") from None


def _feature_page(state: BrowseState, source_id: str, feature_id: int) -> dict:
    with state.cursor() as cur:
        stats = bq.feature_stats(cur, source_id, feature_id)
        if stats is None:
            raise HTTPException(404, f"no feature {source_id}/{feature_id}")
        explanations = bq.feature_explanations(cur, source_id, feature_id)
        windows = bq.sampled_windows(cur, source_id, feature_id)
        origin = "examples"
        if not windows and stats["n_active"]:
            tables = state.window_tables(cur, source_id)
            windows, origin = feature_windows(cur, source_id, feature_id, tables=tables), "activations"
        return _clean({
            "stats": stats, "explanations": explanations, "windows": windows, "windows_from": origin,
            "histogram": bq.feature_histogram(cur, source_id, feature_id),
        })


def create_app(state: BrowseState) -> FastAPI:
    app = FastAPI(title="featurescribe browse", docs_url=None, redoc_url=None, openapi_url=None)
    page = _page()

    @app.exception_handler(FeaturescribeError)
    async def user_error(_, err: FeaturescribeError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    @app.get("/feature/{source_id}/{feature_id}", response_class=HTMLResponse)
    def index(source_id: str | None = None, feature_id: str | None = None):  # the page asks the API
        return page

    @app.get("/api/meta")
    def api_meta():
        with state.cursor() as cur:
            return _clean({"db": state.db_path, **bq.meta(cur)})

    @app.get("/api/features")
    def api_features(source: str | None = None, min_score: float | None = None, max_score: float | None = None,
                     min_lift: float | None = None, min_density: float | None = None,
                     max_density: float | None = None, status: str | None = None, explainer: str | None = None,
                     q: str | None = None, mode: str = "text", sort: str = "score",
                     order: str = Query("desc", pattern="^(asc|desc)$"), offset: int = 0, limit: int = 50):
        lq = bq.ListQuery(source or None, min_score, max_score, min_lift, min_density, max_density, status or None,
                          explainer or None, q if mode == "text" else None, sort, order == "desc", offset, limit)
        with state.cursor() as cur:
            if lq.source:
                source_width(cur, lq.source)  # an unknown source: an error naming the sources
            if mode == "semantic" and q and q.strip():
                rows, total = _semantic(state, cur, lq, q)
            else:
                rows, total = bq.list_features(cur, lq)
        return _clean({"rows": rows, "total": total, "offset": offset, "limit": limit, "mode": mode})

    @app.get("/api/feature/{source_id}/{feature_id}")
    def api_feature(source_id: str, feature_id: str):
        return _feature_page(state, source_id, _feature_number(feature_id))

    @app.get("/api/feature/{source_id}/{feature_id}/neighbours")
    def api_neighbours(source_id: str, feature_id: str):
        """The nearest labels of other features (a scan of every vector: fetched after the page)."""
        feature_id = _feature_number(feature_id)
        with state.cursor() as cur:
            explanations = bq.feature_explanations(cur, source_id, feature_id)
            return _clean({"neighbours": _neighbours(cur, explanations, source_id, feature_id)})

    return app
