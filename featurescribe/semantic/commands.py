"""`featurescribe embed` and `featurescribe search`."""

from __future__ import annotations

import argparse
import sys

from featurescribe.errors import FeaturescribeError
from featurescribe.store.connection import DEFAULT_DB

SEARCH_COLUMNS = ["source_id", "feature_id", "similarity", "explanation", "score", "lift", "density"]


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--embedder", default=None, metavar="BACKEND",
                   help="local:all-minilm-l6-v2 (offline, the default) or openai:MODEL "
                        "(e.g. openai:text-embedding-3-small; ledger, cache and cost as every LLM call)")
    p.add_argument("--source", default=None, metavar="SOURCE_ID", help="one source (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per batch and transaction (default: 256)")


def run_embed(args: argparse.Namespace) -> int:
    from featurescribe.llm.embeddings import DEFAULT_EMBEDDER, check_embedder_spec
    from featurescribe.semantic.embed import embed_labels

    if args.batch_size < 1:
        raise FeaturescribeError("--batch-size must be at least 1")
    kind, model = check_embedder_spec(args.embedder or DEFAULT_EMBEDDER)
    from featurescribe.llm.base import LLMError, ModelNotFound
    from featurescribe.store.connection import Database, lock_timeout, run_lock_timeout

    # open only to read what is missing and to write each batch: label runs and harvests go on beside it
    db = Database(args.db, lock_timeout=run_lock_timeout(), first_lock_timeout=lock_timeout())
    try:
        s = embed_labels(db, f"{kind}:{model}", source_id=args.source, batch=args.batch_size)
        with db.connect() as con:
            index = refresh_index(con, s.embedder)
    except LLMError as err:  # a hosted embedder gave up after its retries (401/403 are user errors)
        if isinstance(err, FeaturescribeError):
            raise
        if isinstance(err, ModelNotFound):
            raise FeaturescribeError(f"{str(err).rstrip('.')}; check the model name in --embedder") from None
        print(f"featurescribe: error: embedding failed: {str(err).splitlines()[0]} (the batches before it are kept; "
              "run embed again to go on)", file=sys.stderr)
        return 1
    print(f"embedded {s.embedded} explanation(s) with {s.embedder}"
          + (f" ({s.dim} dimensions)" if s.dim else "") + f"; {s.already} already had one")
    if index is not None:
        print(f"vector index: {len(index)} vectors in {index.folder}")
    return 0


def refresh_index(con, embedder: str):
    """Bring the search index beside the database up to date now, so the first search is fast."""
    from featurescribe.semantic.vector_index import open_index

    return open_index(con, embedder)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="what the feature should be about, in words, e.g. \"closing brackets\"")
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--source", default=None, metavar="SOURCE_ID", help="search one source (default: all)")
    p.add_argument("-k", type=int, default=10, help="how many features (default: 10)")
    p.add_argument("--min-score", type=float, default=None, help="only labels scoring at least this")
    p.add_argument("--embedder", default=None, metavar="BACKEND",
                   help="whose vectors to search (default: the embedder with most vectors in the database)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def run_search(args: argparse.Namespace) -> int:
    from featurescribe.semantic.search import search
    from featurescribe.store.commands import write_rows

    from featurescribe.store.connection import Database

    hits = search(Database(args.db, read_only=True), args.query, embedder=args.embedder, source_id=args.source,
                  k=args.k, min_score=args.min_score, db_label=f"database {args.db}", db_path=args.db)
    rows = [(h.source_id, h.feature_id, round(h.similarity, 4), h.explanation, h.score, h.lift, h.density)
            for h in hits]
    write_rows(SEARCH_COLUMNS, rows, args.format, sys.stdout)
    return 0
