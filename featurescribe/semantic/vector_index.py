"""A file copy of one embedder's label vectors beside the database, for fast exact search.

Ranking a million 384-d vectors in SQL (`list_inner_product` over `label_embeddings`) reads and
multiplies 1.5 GB of compressed floats: 0.5-0.7 s on 2 cores. This index keeps, in
`DB.vectors/EMBEDDER/`:

- `f16.npy`: every vector in float16 (half the bytes of float32), scanned with one matrix-vector
  product for a first, approximate ranking;
- `f32.npy`: the same vectors in float32 (as stored in the database), read only for the few
  candidates the first pass keeps, to rescore them exactly;
- `ids.npy`, `feature.npy`, `source.npy`: the explanation id, feature id and source of each row;
- `meta.json`: the fingerprint of the rows it was made from (`store.embeddings.fingerprint`) and
  `err`, the largest float16 rounding error of a vector (Euclidean norm).

Exactness: the approximate score of a row differs from its exact cosine by at most `margin`
(the vector's rounding error `err`, the query's, and the float16 rounding of the product, which
torch sums in float32). If t is the n-th best approximate score, the n rows with the best
exact scores all have an approximate score of at least t - 2 * margin; every such row is
rescored from `f32.npy`, so the result is the exact top n (ties by explanation id), the same
as the SQL ranking.

The index is rebuilt when the fingerprint no longer matches (labels added or removed), and
never written into the database: a read-only search (the browser) may build it, and where the
folder cannot be written search falls back to the SQL scan. Deleting the folder is always safe.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from featurescribe.errors import FeaturescribeError
from featurescribe.store import embeddings as emb_sql

MIN_ROWS = 20_000  # below this the SQL scan is fast enough, and no files are made
MIN_ROWS_ENV = "FEATURESCRIBE_VECTOR_INDEX_MIN_ROWS"
_F16_ROUNDING = 2.0 ** -11  # float16's relative rounding error (10-bit mantissa, round to nearest)
_FILES = ("f16.npy", "f32.npy", "ids.npy", "feature.npy", "source.npy")
log = logging.getLogger(__name__)


def index_dir(db_path: str, embedder: str) -> Path:
    return Path(db_path + ".vectors") / re.sub(r"[^A-Za-z0-9._-]+", "_", embedder)


@dataclass
class VectorIndex:
    f16: np.ndarray  # (n, d) float16, memory-mapped
    f32: np.ndarray  # (n, d) float32, memory-mapped
    ids: np.ndarray  # (n,) bytes
    feature: np.ndarray  # (n,) int32
    source: np.ndarray  # (n,) int16: position in `sources`
    sources: list[str]
    err: float
    folder: Path

    def __len__(self) -> int:
        return int(self.f16.shape[0])

    def ranking(self, query: np.ndarray, source_id: str | None = None) -> "Ranking":
        """Approximate scores of every row for one unit `query` (one float16 matrix-vector product)."""
        import torch

        q16 = np.asarray(query, dtype=np.float16)
        q_err = float(np.linalg.norm(np.asarray(query, np.float64) - q16.astype(np.float64)))
        with warnings.catch_warnings():  # torch warns of the read-only memory map; it only reads it
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.from_numpy(self.f16)
        approx = torch.mv(matrix, torch.from_numpy(q16))  # float16 scores, summed in float32
        n_rows = len(self)
        if source_id is not None:
            mask = self.source == (self.sources.index(source_id) if source_id in self.sources else -1)
            approx.masked_fill_(torch.from_numpy(~mask), -torch.inf)
            n_rows = int(np.count_nonzero(mask))
        # |approx - exact| <= the vector's rounding + the query's + the product's (rounded to float16
        # at the end, summed in float32 over d terms); 1e-6 for the query's norm not being exactly 1
        scale = (1.0 + self.err) * (1.0 + q_err)
        margin = self.err + q_err * (1.0 + self.err) + (_F16_ROUNDING + q16.size * 2.0 ** -24) * scale + 1e-6
        return Ranking(self, np.asarray(query, np.float64), approx, margin, n_rows)


@dataclass
class Ranking:
    index: VectorIndex
    query: np.ndarray
    approx: Any  # torch.Tensor of float16, one approximate score a row (-inf: filtered out)
    margin: float
    n_rows: int  # rows the query may return (those of its source)

    def top(self, n: int) -> list[dict]:
        """The exact top `n` rows by cosine similarity (ties by explanation id), as
        `store.embeddings.nearest_explanations` returns them."""
        import torch

        n = min(n, self.n_rows)
        if n <= 0:
            return []
        cut = float(torch.topk(self.approx, n, sorted=False).values.min())
        floor = torch.tensor(_at_most(cut - 2 * self.margin), dtype=torch.float16)
        cand = np.flatnonzero((self.approx >= floor).numpy())  # ascending: cheap memory-map reads
        exact = self.index.f32[cand].astype(np.float64) @ self.query
        ids = self.index.ids[cand]
        order = sorted(range(len(cand)), key=lambda i: (-exact[i], ids[i]))[:n]
        return [{"explanation_id": ids[i].decode(), "source_id": self.index.sources[self.index.source[cand[i]]],
                 "feature_id": int(self.index.feature[cand[i]]), "similarity": float(exact[i])} for i in order]


def _at_most(x: float) -> np.float16:
    """The largest float16 not above `x` (a threshold rounded up would drop rows at the edge)."""
    h = np.float16(x)
    return np.nextafter(h, np.float16(-np.inf)) if float(h) > x else h


def _load(folder: Path) -> tuple[dict, VectorIndex] | None:
    """The index in `folder`, mapped once per process for each version of it: a fresh memory map
    of the float16 file costs more (page tables for every page) than the product itself."""
    try:
        st = (folder / "meta.json").stat()
    except OSError:
        return None
    return _load_version(str(folder), st.st_ino, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _load_version(folder: str, inode: int, mtime_ns: int) -> tuple[dict, VectorIndex] | None:
    path = Path(folder)
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {name: np.load(path / name, mmap_mode="r") for name in _FILES}
    except (OSError, ValueError):
        return None
    return meta, VectorIndex(arrays["f16.npy"], arrays["f32.npy"], arrays["ids.npy"], arrays["feature.npy"],
                             arrays["source.npy"], list(meta["sources"]), float(meta["err"]), path)


def _write(con, folder: Path, embedder: str, stamp: list, n: int) -> None:
    """Write the index files of `n` rows into `folder` (a fresh, private one)."""
    ids, features, sources, codes = [], [], [], {}
    f16 = f32 = None
    err, at = 0.0, 0
    for rb in emb_sql.iter_vectors(con, embedder):
        m = len(rb)
        if m == 0:
            continue
        vec = rb.column("vec")
        flat = vec.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        block = flat.reshape(m, -1)
        if f16 is None:
            d = block.shape[1]
            f16 = np.lib.format.open_memmap(folder / "f16.npy", "w+", np.float16, (n, d))
            f32 = np.lib.format.open_memmap(folder / "f32.npy", "w+", np.float32, (n, d))
        half = block.astype(np.float16)
        err = max(err, float(np.linalg.norm(block - half.astype(np.float32), axis=1).max()))
        f16[at:at + m], f32[at:at + m] = half, block
        at += m
        ids.extend(rb.column("explanation_id").to_pylist())
        features.append(rb.column("feature_id").to_numpy(zero_copy_only=False).astype(np.int32))
        sources.extend(codes.setdefault(s, len(codes)) for s in rb.column("source_id").to_pylist())
    if at != n or f16 is None:
        raise RuntimeError(f"the vectors changed while the index was written ({at} rows, {n} expected)")
    f16.flush(), f32.flush()
    np.save(folder / "ids.npy", np.array([i.encode() for i in ids], dtype=bytes))
    np.save(folder / "feature.npy", np.concatenate(features))
    np.save(folder / "source.npy", np.array(sources, dtype=np.int16))
    meta = {"embedder": embedder, "fingerprint": stamp, "n": n, "dim": int(f16.shape[1]),
            "err": err * (1 + 1e-6), "sources": list(codes)}
    (folder / "meta.json").write_text(json.dumps(meta))


def build(con, db_path: str, embedder: str, stamp: list | None = None) -> VectorIndex | None:
    """(Re)write the index of `embedder`'s vectors; None when its folder cannot be written."""
    stamp = stamp or emb_sql.fingerprint(con, embedder)
    final = index_dir(db_path, embedder)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    except OSError as err:
        log.info("no vector index for %s (%s): searching in SQL", embedder, err)
        return None
    try:
        _write(con, tmp, embedder, stamp, stamp[0])
        old = final.with_name(final.name + f".old-{uuid.uuid4().hex}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as err:
        log.info("vector index for %s not written (%s): searching in SQL", embedder, err)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it became the index
    loaded = _load(final)
    return loaded[1] if loaded else None


def min_rows() -> int:
    """Vectors an embedder needs before search uses (and makes) an index: FEATURESCRIBE_VECTOR_INDEX_MIN_ROWS,
    default 20,000 (a very large value keeps every search in SQL)."""
    raw = os.environ.get(MIN_ROWS_ENV, "").strip()
    try:
        return max(1, int(raw)) if raw else MIN_ROWS
    except ValueError:
        raise FeaturescribeError(f"{MIN_ROWS_ENV} must be a whole number, not {raw!r}") from None


def open_index(con, embedder: str, *, create: bool = True) -> VectorIndex | None:
    """The fresh index of `embedder`'s vectors for the database of `con`, built (when `create`)
    if missing or stale; None when there are fewer than `min_rows()` vectors, the database is in
    memory, or the index cannot be written."""
    db_path = emb_sql.database_path(con)
    if db_path is None:
        return None
    stamp = emb_sql.fingerprint(con, embedder)
    if stamp[0] < min_rows():
        return None
    loaded = _load(index_dir(db_path, embedder))
    if loaded is not None and loaded[0].get("fingerprint") == stamp:
        return loaded[1]
    if not create:
        return None
    log.info("writing the vector index of %s (%d vectors)", embedder, stamp[0])
    return build(con, db_path, embedder, stamp)
