"""The streaming harvest: corpus -> model (up to the site) -> sparse entries -> DuckDB.

Three threads work at once: a reader tokenizes the corpus into batches of sequences, the main
thread runs the model and keeps, on the model's device, only the entries above the threshold, and a
writer inserts those entries (as Arrow tables) into DuckDB, one transaction per batch (or per group
of batches that queued up meanwhile). Queues between them are short, so memory stays flat whatever
the corpus size.

Every committed batch records its sequences in `harvest_progress`; a re-run skips them, so an
interrupted harvest continues where it stopped and a finished one adds nothing. Per-feature
statistics are computed at the end by one SQL aggregate over the stored entries, so they are exact
after any number of resumed runs:

    n_active    = entries kept (act > threshold)       frac_active = n_active / n_tokens
    max_act     = max over kept entries                mean_act    = mean over kept entries
    (n_tokens = positions harvested; position 0 of each sequence is context only and not harvested)
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest import corpus as corpus_mod
from featurescribe.harvest.sae import SAE, check_sae_fits, load_sae, resolve_sae_site
from featurescribe.harvest.sites import SITE_ABBR, SiteReader, check_site

DEFAULT_CTX = 64
DEFAULT_MAX_TOKENS = 100_000
DEFAULT_AUTO_KEEP = 0.01  # `--threshold auto`: keep about 1% of a neuron site's entries
DUCKDB_MEMORY_LIMIT = "128MB"  # the harvest's connection: bounded, whatever the corpus size
FIRST_POS = 1  # positions < FIRST_POS are context only (BOS / the attention sink), not harvested


@dataclass
class HarvestConfig:
    db: str
    model: str
    layer: int
    site: str | None = None  # default: the SAE's site, else 'mlp'
    sae: str | None = None
    corpus: str = "builtin:stdlib"
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None or 0: the whole corpus
    ctx: int = DEFAULT_CTX
    batch_size: int | None = None  # default: 32 on CPU, 128 on CUDA
    device: str = "auto"
    dtype: str | None = None  # default: float32
    threshold: str | float | None = None  # None: 'auto' for neurons, 0 for SAE latents
    source_id: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class HarvestResult:
    source_id: str
    model_id: str
    hook_name: str
    layer: int
    site: str
    kind: str
    width: int
    threshold: float
    n_sequences: int  # sequences harvested for this source in all (all runs)
    n_tokens: int  # positions harvested in all (all runs)
    n_activations: int  # entries stored in all (all runs)
    new_sequences: int  # sequences harvested by this run
    new_tokens: int  # tokens (all positions) run through the model by this run
    seconds: float  # wall time of this run's streaming loop
    alive: int = 0  # features with at least one entry
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# --- naming --------------------------------------------------------------------------------------

def width_label(n: int) -> str:
    """4096 -> '4k', 16384 -> '16k', 1048576 -> '1m', 3000 -> '3000'."""
    if n % (1 << 20) == 0:
        return f"{n >> 20}m"
    if n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def default_source_id(layer: int, site: str, sae_width: int | None = None) -> str:
    """Neuronpedia style: '6-mlp' (neurons), '6-res-sae4k' (an SAE of width 4096 on resid)."""
    base = f"{layer}-{SITE_ABBR[site]}"
    return base if sae_width is None else f"{base}-sae{width_label(sae_width)}"


def parse_threshold(spec) -> tuple[str, float]:
    """('abs', value) | ('keep', fraction). Accepts a number, 'auto' (keep 1%) or 'N%' (keep N%)."""
    if isinstance(spec, (int, float)):
        return "abs", float(spec)
    s = str(spec).strip().lower()
    if s == "auto":
        return "keep", DEFAULT_AUTO_KEEP
    try:
        if s.endswith("%"):
            frac = float(s[:-1]) / 100
            if not 0 < frac < 1:
                raise ValueError
            return "keep", frac
        return "abs", float(s)
    except ValueError:
        raise FeaturescribeError(f"bad --threshold {spec!r}: use a number, 'auto' (keep about 1% of "
                                 "entries) or a percentage like '2%'") from None


# --- batches ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    seq_ids: np.ndarray  # int64 [B]
    corpus_index: np.ndarray  # int64 [B]
    token_ids: list[np.ndarray]  # int32 each
    new: np.ndarray  # bool [B]: sequences not yet in the `sequences` table

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.token_ids))


@dataclass
class _Plan:
    """What the database already holds for this source and corpus."""

    known_index: np.ndarray  # sorted corpus_index of existing sequences (same tokenizer + corpus key)
    known_seq: np.ndarray  # their seq_ids
    done_index: np.ndarray  # sorted corpus_index already harvested for this source
    next_seq_id: int


def _member(sorted_arr: np.ndarray, x: int) -> int:
    """Position of x in a sorted array, or -1."""
    i = int(np.searchsorted(sorted_arr, x))
    return i if i < len(sorted_arr) and sorted_arr[i] == x else -1


def _batches(seqs: Iterator[corpus_mod.Sequence], plan: _Plan, batch_size: int) -> Iterator[Batch]:
    next_id = plan.next_seq_id
    buf: list[tuple[int, int, np.ndarray, bool]] = []
    for s in seqs:
        if _member(plan.done_index, s.corpus_index) >= 0:
            continue
        k = _member(plan.known_index, s.corpus_index)
        if k >= 0:
            sid, new = int(plan.known_seq[k]), False
        else:
            sid, new = next_id, True
            next_id += 1
        buf.append((sid, s.corpus_index, s.token_ids, new))
        if len(buf) == batch_size:
            yield _mk_batch(buf)
            buf = []
    if buf:
        yield _mk_batch(buf)


def _mk_batch(buf) -> Batch:
    return Batch(np.array([b[0] for b in buf], dtype=np.int64), np.array([b[1] for b in buf], dtype=np.int64),
                 [b[2] for b in buf], np.array([b[3] for b in buf], dtype=bool))


class _Prefetch:
    """Runs an iterator in a thread, a few items ahead."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._it, self._stop, self.error = it, threading.Event(), None
        self._t = threading.Thread(target=self._run, name="harvest-reader", daemon=True)
        self._t.start()

    def _run(self):
        try:
            for item in self._it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self.error = err
        finally:
            self._put_end()

    def _put_end(self):
        while not self._stop.is_set():
            try:
                self._q.put(self._END, timeout=0.2)
                return
            except queue.Full:
                continue

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def close(self):
        self._stop.set()
        self._t.join(timeout=5)


# --- writing ----------------------------------------------------------------------------------------

def _const_strings(value: str, n: int) -> pa.Array:
    """A string column of n copies of value, built from buffers (no Python loop)."""
    b = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(b)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b * n))


class _TokenStrings:
    """Token id -> its text as the tokenizer decodes that one token (' def' keeps its space).

    Each id is decoded once, when first seen; a batch's `tokens` column is then a vectorized take.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        n = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        self.text = np.empty(n, dtype=object)
        self.known = np.zeros(n, dtype=bool)
        self.decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)

    def _decode(self, i: int) -> str:
        piece = self.tok.convert_ids_to_tokens(i)
        if piece is None:
            return ""
        if self.decoder is not None:
            return self.decoder.decode([piece])
        return self.tok.convert_tokens_to_string([piece])

    def __call__(self, ids: np.ndarray) -> pa.Array:
        uniq = np.unique(ids)
        for i in uniq[~self.known[uniq]].tolist():
            self.text[i] = self._decode(i)
            self.known[i] = True
        return pa.array(self.text[ids], type=pa.string())


@dataclass
class _Item:
    batch: Batch
    idx: np.ndarray  # int32 [N, 3]: batch row, position, feature
    vals: np.ndarray  # float32 [N]


class _Writer:
    """The DuckDB side: a thread that commits batches (grouping those that queued up)."""

    def __init__(self, con, source_id: str, tokenizer_id: str, corpus_key: str, token_strings: _TokenStrings,
                 source_row: dict | None):
        self.con, self.source_id = con, source_id
        self.tokenizer_id, self.corpus_key, self.token_strings = tokenizer_id, corpus_key, token_strings
        self.source_row = source_row  # inserted with the first commit when the source is new
        self.q: queue.Queue = queue.Queue(maxsize=3)
        self.error: BaseException | None = None
        self.rows = 0
        self.commits = 0
        self._t = threading.Thread(target=self._run, name="harvest-writer", daemon=True)
        self._t.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self._t.is_alive():
                    raise RuntimeError("the harvest writer stopped") from self.error

    def close(self) -> None:
        """Write what is queued, then stop; re-raise a writer error."""
        if self._t.is_alive():
            self.put(None)
            self._t.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                items, end = [], item is None
                if item is not None:
                    items.append(item)
                while not end:
                    try:
                        more = self.q.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        end = True
                    else:
                        items.append(more)
                if items:
                    self._write(items)
                if end:
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            self.error = err

    def _tables(self, it: _Item) -> tuple[pa.Table | None, pa.Table | None, pa.Table]:
        """(sequences, activations, harvest_progress) rows of one batch."""
        b = it.batch
        seqs = None
        if b.new.any():
            rows = np.flatnonzero(b.new)
            toks = [b.token_ids[r] for r in rows]
            lens = np.array([len(t) for t in toks], dtype=np.int32)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
            flat = np.concatenate(toks).astype(np.int32)
            seqs = pa.table({
                "seq_id": pa.array(b.seq_ids[rows]),
                "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat)),
                "tokens": pa.ListArray.from_arrays(offsets, self.token_strings(flat)),
                "tokenizer_id": _const_strings(self.tokenizer_id, len(rows)),
                "corpus": _const_strings(self.corpus_key, len(rows)),
                "corpus_index": pa.array(b.corpus_index[rows]),
            })
        n = len(it.vals)
        acts = pa.table({  # source_id: a constant of the INSERT (see _write)
            "feature_id": pa.array(it.idx[:, 2]),
            "seq_id": pa.array(b.seq_ids[it.idx[:, 0]]),
            "pos": pa.array(it.idx[:, 1]),
            "act": pa.array(it.vals),
        }) if n else None
        progress = pa.table({"seq_id": pa.array(b.seq_ids)})
        return seqs, acts, progress

    def _write(self, items: list[_Item]) -> None:
        """One transaction for the batches at hand: one insert per table (Arrow chunks concatenated)."""
        from featurescribe.store.bulk import insert_arrow

        parts = [self._tables(it) for it in items]
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            if self.source_row is not None:
                insert_arrow(con, "sources", {k: [v] for k, v in self.source_row.items()})
            for i, table in enumerate(("sequences", "activations", "harvest_progress")):
                chunks = [p[i] for p in parts if p[i] is not None]
                if chunks:
                    insert_arrow(con, table, pa.concat_tables(chunks) if len(chunks) > 1 else chunks[0],
                                 consts=None if table == "sequences" else {"source_id": self.source_id})
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self.rows += sum(len(it.vals) for it in items)
        self.source_row = None
        self.commits += 1


# --- the harvest --------------------------------------------------------------------------------

def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _plan(con, source_id: str, tokenizer_id: str, corpus_key: str) -> _Plan:
    known = con.execute(
        "SELECT corpus_index, seq_id FROM sequences WHERE tokenizer_id = ? AND corpus = ? ORDER BY corpus_index",
        [tokenizer_id, corpus_key]).fetchnumpy()
    done = con.execute(
        "SELECT s.corpus_index FROM harvest_progress p JOIN sequences s USING (seq_id) "
        "WHERE p.source_id = ? AND s.tokenizer_id = ? AND s.corpus = ? ORDER BY 1",
        [source_id, tokenizer_id, corpus_key]).fetchnumpy()
    nxt = con.execute("SELECT coalesce(max(seq_id) + 1, 0) FROM sequences").fetchone()[0]
    return _Plan(np.asarray(known["corpus_index"], dtype=np.int64), np.asarray(known["seq_id"], dtype=np.int64),
                 np.asarray(done["corpus_index"], dtype=np.int64), int(nxt))


def _check_existing(con, source_id: str, want: dict, explicit_threshold: bool) -> tuple[bool, float | None]:
    """(exists, stored threshold). A source that exists with other settings is an error."""
    row = con.execute(
        "SELECT model_id, hook_name, layer, kind, width, sae_path, corpus, ctx, threshold, params "
        "FROM sources WHERE source_id = ?", [source_id]).fetchone()
    if row is None:
        return False, None
    have = dict(zip(["model_id", "hook_name", "layer", "kind", "width", "sae_path", "corpus", "ctx"], row[:8]))
    params = json.loads(row[9]) if row[9] else {}
    have["tokenizer_id"] = params.get("tokenizer_id")
    diffs = [f"{k} {have[k]!r} (now {want[k]!r})" for k in have if have[k] != want[k]]
    stored = float(row[8]) if row[8] is not None else None
    if explicit_threshold and stored is not None and abs(stored - want["threshold"]) > 1e-9 * max(1.0, abs(stored)):
        diffs.append(f"threshold {stored!r} (now {want['threshold']!r})")
    if diffs:
        raise FeaturescribeError(
            f"source {source_id} already exists with {'; '.join(diffs)}; pass --source-id NEW_ID to keep "
            "both, or --overwrite to replace it")
    return True, stored


def _delete_source(con, source_id: str) -> None:
    con.execute("BEGIN TRANSACTION")
    try:
        for table in ("activations", "features", "harvest_progress", "sources"):
            con.execute(f"DELETE FROM {table} WHERE source_id = ?", [source_id])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _finalize(con, source_id: str, width: int, params: dict) -> tuple[int, int, int, int]:
    """Exact per-feature stats from the stored entries; sources.n_tokens. -> (n_seq, n_tok, n_act, alive)."""
    n_seq, n_tok = con.execute(
        "SELECT count(*), coalesce(sum(greatest(len(s.token_ids) - ?, 0)), 0) "
        "FROM harvest_progress p JOIN sequences s USING (seq_id) WHERE p.source_id = ?",
        [FIRST_POS, source_id]).fetchone()
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("DELETE FROM features WHERE source_id = ?", [source_id])
        con.execute(
            """
            INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act, status)
            SELECT ?, f.i::INTEGER, coalesce(a.n, 0), coalesce(a.n, 0) / greatest(?, 1)::DOUBLE, a.mx, a.mean,
                   CASE WHEN a.n IS NULL THEN 'dead' ELSE 'alive' END
            FROM range(?) f(i)
            LEFT JOIN (SELECT feature_id, count(*) AS n, max(act) AS mx, avg(act) AS mean
                       FROM activations WHERE source_id = ? GROUP BY feature_id) a ON a.feature_id = f.i
            """, [source_id, int(n_tok), int(width), source_id])
        con.execute("UPDATE sources SET n_tokens = ?, params = ? WHERE source_id = ?",
                    [int(n_tok), json.dumps(params), source_id])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    n_act, alive = con.execute(
        "SELECT coalesce(sum(n_active), 0), count(*) FILTER (WHERE n_active > 0) FROM features WHERE source_id = ?",
        [source_id]).fetchone()
    return int(n_seq), int(n_tok), int(n_act), int(alive)


def _auto_threshold(acts, valid, keep: float) -> float:
    """The value above which about `keep` of the valid entries lie (never below 0)."""
    import torch

    x = acts[valid].float().flatten()
    if x.numel() == 0:
        return 0.0
    if x.numel() > (1 << 24):  # a strided sample is plenty for a quantile
        x = x[:: x.numel() // (1 << 24) + 1]
    k = max(1, int(round(keep * x.numel())))
    v = float(torch.topk(x, k).values.min())
    v = max(v, 0.0)
    return float(f"{v:.4g}")


class Harvester:
    """A loaded model + site (+ SAE), reusable for several harvests (benchmarks, tests)."""

    def __init__(self, model, tokenizer, *, model_id: str, layer: int, site: str | None = None,
                 sae: str | SAE | None = None, device: str | None = None):
        import torch

        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.device = torch.device(device) if device else next(model.parameters()).device
        sae_obj = load_sae(sae, device="cpu") if isinstance(sae, (str, Path)) else sae
        if site is not None:
            check_site(site)
        if sae_obj is not None:
            site, layer = resolve_sae_site(sae_obj, layer, site)
        self.reader = SiteReader(model, site or "mlp", layer)
        self.site = self.reader.site
        if sae_obj is not None:
            check_sae_fits(sae_obj, self.site)
        self.sae = sae_obj.to(self.device) if sae_obj is not None else None
        self.kind = "sae" if self.sae is not None else "neuron"
        self.width = self.sae.width if self.sae is not None else self.site.width

    def default_source_id(self) -> str:
        return default_source_id(self.site.layer, self.site.site, self.sae.width if self.sae is not None else None)

    # the per-batch device work -------------------------------------------------------------------
    def features(self, input_ids):
        """Feature activations [B, T, width] for a padded batch (neurons, or SAE latents)."""
        acts = self.reader.run(input_ids)
        return self.sae.encode(acts) if self.sae is not None else acts

    def to_device(self, batch: Batch):
        import torch

        B, T = len(batch.token_ids), max(len(t) for t in batch.token_ids)
        ids = np.zeros((B, T), dtype=np.int64)  # right padding: a causal model's real positions ignore it
        lengths = np.empty(B, dtype=np.int64)
        for i, t in enumerate(batch.token_ids):
            ids[i, : len(t)] = t
            lengths[i] = len(t)
        pin = self.device.type == "cuda"
        t_ids = torch.from_numpy(ids)
        t_len = torch.from_numpy(lengths)
        if pin:
            t_ids, t_len = t_ids.pin_memory(), t_len.pin_memory()
        return t_ids.to(self.device, non_blocking=pin), t_len.to(self.device, non_blocking=pin)

    def sparse(self, acts, lengths, threshold: float):
        """Entries above `threshold` at harvested positions: (idx int32 [N,3], vals float32 [N]) on the CPU."""
        import torch

        mask = (acts > threshold) & self.valid_mask(acts, lengths)[:, :, None]
        nz = mask.nonzero()  # one host sync per batch (the boolean-mask gather would be a second one)
        vals = acts[nz[:, 0], nz[:, 1], nz[:, 2]].float()
        return nz.to(torch.int32).cpu().numpy(), vals.cpu().numpy()

    @staticmethod
    def valid_mask(acts, lengths):
        """[B, T] bool: the positions harvested (FIRST_POS <= pos < the sequence's length)."""
        import torch

        pos = torch.arange(acts.shape[1], device=acts.device)
        return (pos[None, :] >= FIRST_POS) & (pos[None, :] < lengths[:, None])

    # the whole harvest -----------------------------------------------------------------------------
    def run(self, con, cfg: HarvestConfig, corpus: corpus_mod.Corpus, first: corpus_mod.Sequence | None = None,
            seqs: Iterator[corpus_mod.Sequence] | None = None) -> HarvestResult:
        import torch

        from featurescribe.progress import Progress

        source_id = cfg.source_id or self.default_source_id()
        tokenizer_id = corpus_mod.tokenizer_fingerprint(self.tokenizer)
        corpus_key = corpus.key(cfg.ctx)
        rule, tval = parse_threshold(cfg.threshold if cfg.threshold is not None
                                     else ("auto" if self.kind == "neuron" else 0.0))
        explicit = cfg.threshold is not None and rule == "abs"
        want = {"model_id": self.model_id, "hook_name": self.site.hook_name, "layer": self.site.layer,
                "kind": self.kind, "width": self.width, "sae_path": self.sae.path if self.sae is not None else None,
                "corpus": corpus.name, "ctx": cfg.ctx, "tokenizer_id": tokenizer_id,
                "threshold": tval if rule == "abs" else None}
        if cfg.overwrite:
            _delete_source(con, source_id)
        exists, stored = _check_existing(con, source_id, want, explicit)
        threshold = stored if stored is not None else (tval if rule == "abs" else None)
        batch_size = cfg.batch_size or (128 if self.device.type == "cuda" else 32)
        params = {
            "tokenizer_id": tokenizer_id, "corpus_key": corpus_key, "corpus_spec": corpus.spec,
            "first_pos": FIRST_POS, "bos": corpus_mod.adds_bos(self.tokenizer),
            "threshold_rule": f"keep {tval:.2%} (estimated on the first batch)" if rule == "keep" else "absolute",
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": self.device.type, "batch_size": batch_size, "max_tokens": cfg.max_tokens,
        }
        if self.sae is not None:
            params["sae"] = {"architecture": self.sae.cfg.architecture, "hook_name": self.sae.cfg.hook_name,
                             "d_in": self.sae.cfg.d_in, "d_sae": self.sae.cfg.d_sae, "k": self.sae.cfg.k,
                             "format": self.sae.cfg.format, "transcoder": self.sae.cfg.transcoder}
        source_row = {
            "source_id": source_id, "model_id": self.model_id, "hook_name": self.site.hook_name,
            "layer": self.site.layer, "kind": self.kind, "width": self.width, "site": self.site.site,
            "threshold": threshold, "sae_path": want["sae_path"], "corpus": corpus.name, "ctx": cfg.ctx,
            "n_tokens": None, "params": json.dumps({**params, "status": "running"}), "created_at": _now(),
        } if not exists else None

        plan = _plan(con, source_id, tokenizer_id, corpus_key)
        max_tokens = cfg.max_tokens or None
        if seqs is None:
            seqs = corpus_mod.sequences(corpus, self.tokenizer, cfg.ctx, max_tokens)
        if first is not None:
            seqs = _chain_first(first, seqs)
        done_tokens = len(plan.done_index) * cfg.ctx
        total = max(-(-max_tokens // cfg.ctx) * cfg.ctx - done_tokens, 0) if max_tokens else None  # whole sequences

        writer = _Writer(con, source_id, tokenizer_id, corpus_key, _TokenStrings(self.tokenizer), source_row)
        reader = _Prefetch(_batches(seqs, plan, batch_size))
        new_seqs = new_tokens = 0
        t0 = time.monotonic()
        try:
            with Progress("harvest", total=total, unit="tok", enabled=cfg.progress) as bar, torch.inference_mode():
                for batch in reader:
                    ids, lengths = self.to_device(batch)
                    acts = self.features(ids)
                    if threshold is None:
                        threshold = _auto_threshold(acts, self.valid_mask(acts, lengths), tval)
                        if writer.source_row is not None:  # not written yet: the writer has no item
                            writer.source_row["threshold"] = threshold
                    idx, vals = self.sparse(acts, lengths, threshold)
                    del acts
                    writer.put(_Item(batch, idx, vals))
                    n = batch.n_tokens
                    new_seqs += len(batch.seq_ids)
                    new_tokens += n
                    bar.advance(n)
        except BaseException:
            reader.close()
            try:
                writer.close()  # keep what was computed: it is committed and a re-run continues after it
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        reader.close()
        writer.close()
        seconds = time.monotonic() - t0
        if threshold is None:  # nothing was left to run
            threshold = tval if rule == "abs" else 0.0
        params.update(status="complete", seconds=round(seconds, 3),
                      tokens_per_s=round(new_tokens / seconds, 1) if seconds > 0 else None)
        n_seq, n_tok, n_act, alive = _finalize(con, source_id, self.width, params)
        if n_seq == 0:
            raise FeaturescribeError(f"corpus {corpus.spec} gave no sequences to harvest")
        return HarvestResult(
            source_id=source_id, model_id=self.model_id, hook_name=self.site.hook_name, layer=self.site.layer,
            site=self.site.site, kind=self.kind, width=self.width, threshold=float(threshold),
            n_sequences=n_seq, n_tokens=n_tok, n_activations=n_act, new_sequences=new_seqs,
            new_tokens=new_tokens, seconds=seconds, alive=alive,
        )


def _chain_first(first, rest):
    yield first
    yield from rest


def harvest(cfg: HarvestConfig, loaded=None) -> HarvestResult:
    """Run a harvest from a config. Every user error is raised before the database is opened.

    `loaded`: an optional `(model_id, model, tokenizer)` already in memory (tests, benchmarks).
    """
    from featurescribe.harvest.models import load_causal_lm, pick_device, resolve_model, torch_dtype
    from featurescribe.store import open_db

    if cfg.site is not None:
        check_site(cfg.site)
    if cfg.ctx < 2:
        raise FeaturescribeError("--ctx must be at least 2")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise FeaturescribeError("--batch-size must be at least 1")
    if cfg.max_tokens is not None and cfg.max_tokens < 0:
        raise FeaturescribeError("--max-tokens must be positive (0: the whole corpus)")
    if cfg.threshold is not None:
        parse_threshold(cfg.threshold)
    corpus = corpus_mod.open_corpus(cfg.corpus)
    sae = load_sae(cfg.sae, device="cpu") if cfg.sae else None
    if loaded is None:
        device = pick_device(cfg.device)
        torch_dtype(cfg.dtype)
        ref = resolve_model(cfg.model)
        model, tokenizer = load_causal_lm(ref, device=device, dtype=cfg.dtype)
        model_id = ref.model_id
    else:
        model_id, model, tokenizer = loaded
    h = Harvester(model, tokenizer, model_id=model_id, layer=cfg.layer, site=cfg.site, sae=sae)
    seqs = corpus_mod.sequences(corpus, tokenizer, cfg.ctx, cfg.max_tokens or None)
    first = next(seqs, None)
    if first is None:
        raise FeaturescribeError(f"corpus {cfg.corpus} is empty: it has no text to harvest")
    con = open_db(cfg.db)
    try:
        # DuckDB otherwise keeps every block it wrote cached, and memory would grow with the corpus
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        return h.run(con, cfg, corpus, first=first, seqs=seqs)
    finally:
        con.close()


def result_dict(r: HarvestResult) -> dict:
    d = asdict(r)
    d["tokens_per_s"] = r.tokens_per_s
    return d
