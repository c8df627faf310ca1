"""Semantic search over the best label of every feature (`featurescribe search`, browse, Python).

The query is embedded by the embedder that made the database's vectors (the one with most
vectors, unless one is named); the nearest explanation vectors are ranked with the vector index
beside the database (semantic/vector_index.py: exact, one float16 pass and a float32 rescoring) or,
without one, with one SQL scan; a hit counts when its explanation is its feature's best label (the
`labels` view). When too few of
the nearest vectors are best labels (other candidates, other explainers, `--min-score`), the scan
is widened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurescribe.errors import BadOption, NoEmbeddings
from featurescribe.llm.embeddings import embed_sync, make_embedder
from featurescribe.store import embeddings as emb_sql


@dataclass
class SearchHit:
    source_id: str
    feature_id: int
    similarity: float
    explanation: str
    score: float | None
    scorer: str | None
    lift: float | None
    density: float | None
    explainer: str | None
    explanation_id: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def pick_embedder(con, embedder: str | None, db_label: str = "the database", db_path: str = "PATH") -> str:
    """The embedder whose vectors a search uses, or a user error saying how to make them."""
    present = emb_sql.embedders_present(con)
    if embedder is not None:
        from featurescribe.llm.embeddings import check_embedder_spec

        kind, model = check_embedder_spec(embedder)
        embedder = f"{kind}:{model}"
    if not present:
        raise NoEmbeddings(
            f"{db_label} has no label embeddings; make them with: featurescribe embed --db {db_path}"
            + (f" --embedder {embedder}" if embedder else ""))
    if embedder is None:
        return present[0][0]
    if embedder not in dict(present):
        have = ", ".join(e for e, _ in present)
        raise NoEmbeddings(f"{db_label} has no embeddings by {embedder} (it has: {have}); "
                           f"make them with: featurescribe embed --db {db_path} --embedder {embedder}")
    return embedder


class _Nearest:
    """The `n` nearest explanation vectors for one query, for growing `n`: from the vector index
    (one scan, kept) when the database has one, else from one SQL scan per call."""

    def __init__(self, con, embedder: str, qvec: np.ndarray, source_id: str | None, use_index: bool):
        from featurescribe.semantic.vector_index import open_index

        self.con, self.embedder, self.qvec, self.source_id = con, embedder, qvec, source_id
        index = open_index(con, embedder) if use_index else None
        self.ranking = index.ranking(qvec, source_id) if index is not None else None
        self.total = len(index) if index is not None else int(con.execute(
            "SELECT count(*) FROM label_embeddings WHERE embedder = ?", [embedder]).fetchone()[0])

    def top(self, n: int) -> list[dict]:
        if self.ranking is not None:
            return self.ranking.top(n)
        return emb_sql.nearest_explanations(self.con, self.embedder, self.qvec, n, self.source_id)


def rank_hits(con, embedder: str, qvec: np.ndarray, *, k: int, source_id: str | None = None,
              min_score: float | None = None, use_index: bool = True) -> list[SearchHit]:
    """The `k` features whose best label is nearest to `qvec` (a unit vector). `use_index`:
    rank with the vector index beside the database (semantic/vector_index.py; the same exact
    result as the SQL scan, which runs where there is no index)."""
    n = max(4 * k, 64)
    nearest = _Nearest(con, embedder, qvec, source_id, use_index)
    while True:
        near = nearest.top(n)
        best = emb_sql.best_labels_of(con, [(h["source_id"], h["feature_id"]) for h in near])
        hits: dict[tuple[str, int], SearchHit] = {}
        for h in near:
            key = (h["source_id"], h["feature_id"])
            b = best.get(key)
            if key in hits or b is None or b["explanation_id"] != h["explanation_id"]:
                continue
            if min_score is not None and (b["score"] is None or b["score"] < min_score):
                continue
            hits[key] = SearchHit(key[0], key[1], h["similarity"], b["explanation"], b["score"], b["scorer"],
                                  b["lift"], b["frac_active"], b["explainer"], b["explanation_id"])
        if len(hits) >= k or len(near) < n or n >= nearest.total:
            return list(hits.values())[:k]
        n *= 8


def search(con, query: str, *, embedder: str | None = None, source_id: str | None = None, k: int = 10,
           min_score: float | None = None, db_label: str = "the database", db_path: str = "PATH") -> list[SearchHit]:
    """Features whose best label is closest in meaning to `query`, nearest first. `con`: an open
    connection, or a `Database` opened to pick the embedder and to rank, and closed in between,
    while the embedder loads and embeds the query."""
    from featurescribe.store.connection import session

    if not query.strip():
        raise BadOption("the search query is empty")
    if k < 1:
        raise BadOption("-k must be at least 1")
    with session(con) as c:
        if source_id is not None:
            from featurescribe.store.labelling import source_width

            source_width(c, source_id)  # an unknown source is an error, not an empty answer
        spec = pick_embedder(c, embedder, db_label, db_path)
    qvec = embed_sync(make_embedder(spec), [query], purpose="search")[0]
    with session(con) as c:
        return rank_hits(c, spec, qvec, k=k, source_id=source_id, min_score=min_score)
