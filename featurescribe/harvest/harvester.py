"""The streaming harvest: corpus -> model (one pass, up to the deepest site) -> sparse entries -> DuckDB.

Three kinds of threads work at once: a reader tokenizes the corpus into batches of sequences, the
main thread runs the model once per batch for every source (layer x site neurons and SAEs) and keeps,
on the model's device, only the entries above each source's threshold, and writer threads commit
those entries to DuckDB in large Arrow inserts (featurescribe/harvest/writer.py). Queues between them
are short, so memory stays flat whatever the corpus size.

Every committed batch records its sequences per source in `harvest_progress`; a re-run skips them,
so an interrupted harvest continues where it stopped and a finished one adds nothing. Per-feature
statistics are computed at the end by one SQL aggregate over the stored entries, so they are exact
after any number of resumed runs (or merged shards):

    n_active    = entries kept (act > threshold)       frac_active = n_active / n_tokens
    max_act     = max over kept entries                mean_act    = mean over kept entries
    (n_tokens = positions harvested; position 0 of each sequence is context only and not harvested)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from featurescribe.errors import BadOption, FeaturescribeError
from featurescribe.harvest import corpus as corpus_mod
from featurescribe.harvest.batches import Batch, Plan, Prefetch, SeqIds, make_batches
from featurescribe.harvest.early import Background, EarlyBatch, early_forward, first_sequences, plan_skips
from featurescribe.harvest.sae import SAE, load_saes
from featurescribe.harvest.sites import MultiSiteReader, decoder_layers, n_layers
from featurescribe.harvest.source_state import FIRST_POS, SourceState, prepare_states, settings_diffs, source_row
from featurescribe.harvest.sources import (SourcePlan, bind_sites, check_layers, check_source_id,  # noqa: F401
                                           default_source_id, follow_post_norms, parse_layers, parse_sites,
                                           plan_sources, width_label)
from featurescribe.harvest.thresholds import auto_threshold, parse_threshold  # noqa: F401
from featurescribe.harvest.writer import WRITER_THREADS, Item, RowMaker, TokenStrings, Writers
from featurescribe.interrupts import stop_if_received
from featurescribe.native_memory import keep_freed_memory_for_tensors, return_freed_memory
from featurescribe.store.connection import session
from featurescribe.store.transaction import transaction

DEFAULT_CTX = 64
DEFAULT_MAX_TOKENS = 100_000
SEQUENCES_AHEAD = 256  # tokenized sequences the corpus reader keeps ready


@dataclass
class HarvestConfig:
    db: str
    model: str
    layer: int | str | list[int] | None = None  # 6, '3,6,9', '0-29', 'all'; None: the SAEs' own layers
    site: str | list[str] | None = None  # comma list; default 'mlp' (neurons) unless only SAEs are given
    sae: str | list[str] | None = None  # one or more SAE folders, each read at its own hook
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
    index_range: tuple[int, int | None] | None = None  # shards: corpus indices [lo, hi) only
    thresholds: dict[str, float] | None = None  # shards: each source's threshold, fixed beforehand
    writer_threads: int = WRITER_THREADS

    @property
    def sae_paths(self) -> list[str]:
        return [] if not self.sae else [self.sae] if isinstance(self.sae, (str, Path)) else list(self.sae)


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
    new_sequences: int  # sequences harvested for this source by this run
    new_tokens: int  # tokens (all positions) run through the model by this run
    seconds: float  # wall time of this run's streaming loop
    alive: int = 0  # features with at least one entry
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Setup:
    """What a harvest reads from the database before its first batch."""

    tokenizer_id: str
    corpus_key: str
    states: list[SourceState]
    plan: Plan
    keys: list[int]  # each source's storage key


@dataclass
class _Loop:
    """What the streaming loop counted."""

    started: float = 0.0  # time.monotonic() when the loop started
    seconds: float = 0.0
    tokens: int = 0
    sequences: list[int] = field(default_factory=list)  # per source


class Harvester:
    """A loaded model and its sources (sites x layers, SAEs), reusable for several harvests."""

    def __init__(self, model, tokenizer, *, model_id: str, layer=None, site=None,
                 sae: str | SAE | list | None = None, device: str | None = None, source_id: str | None = None):
        import torch

        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.device = torch.device(device) if device else next(model.parameters()).device
        saes = load_saes([] if sae is None else sae if isinstance(sae, list) else [sae])
        n = n_layers(model)
        self.plans = plan_sources(parse_layers(layer, n), parse_sites(site), saes, source_id)
        check_layers(self.plans, n)
        follow_post_norms(self.plans, decoder_layers(model)[1])
        self.reader = MultiSiteReader(model, [p.key for p in self.plans])
        bind_sites(self.plans, self.reader.sites)
        for p in self.plans:
            if p.sae is not None:
                p.sae = p.sae.to(self.device)

    # single-source views, for callers that read one source
    @property
    def site(self):
        return self.reader.sites[self.plans[0].key]

    @property
    def width(self) -> int:
        return self.plans[0].width

    @property
    def kind(self) -> str:
        return self.plans[0].kind

    def default_source_id(self) -> str:
        return self.plans[0].source_id

    # the per-batch device work -------------------------------------------------------------------
    def features(self, input_ids) -> list:
        """Feature activations [B, T, width] of every source for a padded batch (one forward pass)."""
        captures = self.reader.run(input_ids)
        return [p.sae.encode(captures[p.key]) if p.sae is not None else captures[p.key] for p in self.plans]

    def to_device(self, batch: Batch):
        return self.pad_to_device(batch.token_ids)

    def pad_to_device(self, token_ids: list[np.ndarray]):
        """(ids [B, T] int64, lengths [B]) on the model's device, right-padded with zeros."""
        import torch

        B, T = len(token_ids), max(len(t) for t in token_ids)
        ids = np.zeros((B, T), dtype=np.int64)  # right padding: a causal model's real positions ignore it
        lengths = np.empty(B, dtype=np.int64)
        for i, t in enumerate(token_ids):
            ids[i, : len(t)] = t
            lengths[i] = len(t)
        pin = self.device.type == "cuda"
        t_ids, t_len = torch.from_numpy(ids), torch.from_numpy(lengths)
        if pin:
            t_ids, t_len = t_ids.pin_memory(), t_len.pin_memory()
        return t_ids.to(self.device, non_blocking=pin), t_len.to(self.device, non_blocking=pin)

    @staticmethod
    def sparse(acts, valid, threshold: float):
        """Entries above `threshold` (idx int32 [N, 3]: row/pos/feature, vals float32 [N]) on the CPU,
        where `valid` [B, T] (None: every position from FIRST_POS). One flat mask, its nonzero
        positions and a 1-D gather: cheaper than a 3-D nonzero and a 3-index gather."""
        import torch

        if acts.device.type == "cpu" and acts.dtype == torch.float32:
            return _sparse_numpy(acts.numpy(), None if valid is None else valid.numpy(), threshold)
        B, T, W = acts.shape
        lin = _kept_mask(acts, valid, threshold).view(-1).nonzero().squeeze(1)  # one host sync per source and batch
        vals = acts.reshape(-1)[lin].float()
        bt = lin // W
        idx = torch.stack([bt // T, bt % T, lin % W], 1).to(torch.int32)
        return idx.cpu().numpy(), vals.cpu().numpy()

    @staticmethod
    def valid_mask(T: int, lengths):
        """[B, T] bool: the positions harvested (FIRST_POS <= pos < the sequence's length)."""
        import torch

        pos = torch.arange(T, device=lengths.device)
        return (pos[None, :] >= FIRST_POS) & (pos[None, :] < lengths[:, None])

    def _item(self, batch: Batch, states: list[SourceState], captured: dict | None = None) -> Item:
        """One forward pass: each source's kept entries (thresholds estimated on the first batch).
        Each site's activations are sparsified as the pass makes them, so that only one site's
        dense activations (and SAE latents) exist at a time. `captured`: the batch's activations at
        every site, from a pass already run (harvest/early.py)."""
        import torch

        ids, lengths = self.to_device(batch)
        T = ids.shape[1]
        padded = any(len(t) < T for t in batch.token_ids)
        valid = self.valid_mask(T, lengths) if padded or batch.todo is not None else None
        by_key: dict = {}
        for k, p in enumerate(self.plans):
            by_key.setdefault(p.key, []).append(k)

        def keep(key, x):
            out = []
            for k in by_key[key]:
                st, sae = states[k], self.plans[k].sae
                acts = sae.encode(x) if sae is not None else x
                rows = valid if batch.todo is None else valid & torch.from_numpy(batch.todo[k]).to(valid.device)[:, None]
                if st.threshold is None:
                    st.threshold = auto_threshold(acts[:, FIRST_POS:] if rows is None else acts[rows], st.keep)
                out.append((k, *self.sparse(acts, rows, st.threshold)))
            return out

        if captured is None:
            kept = self.reader.run(ids, on_capture=keep)
        else:
            kept = {key: keep(key, x) for key, x in captured.items()}
        return Item(batch, sorted((part for parts in kept.values() for part in parts), key=lambda part: part[0]))

    # the whole harvest -----------------------------------------------------------------------------
    def run(self, db, cfg: HarvestConfig, corpus: corpus_mod.Corpus, first: corpus_mod.Sequence | None = None,
            seqs: Iterator[corpus_mod.Sequence] | None = None) -> list[HarvestResult]:
        """`db`: a `Database` (opened for each read and each commit, closed in between, so
        readers and other runs use the file meanwhile) or an open connection."""
        if self.device.type == "cpu":
            keep_freed_memory_for_tensors()  # a model loaded by the caller did not pass load_causal_lm
        batch_size = cfg.batch_size or (128 if self.device.type == "cuda" else 32)
        if seqs is None:
            seqs = corpus_mod.sequences(corpus, self.tokenizer, cfg.ctx, cfg.max_tokens or None)
        if first is not None:
            seqs = _chain_first(first, seqs)
        started = time.monotonic()  # the streaming loop's clock: the early pass is part of it
        setup = Background(lambda: self._setup(db, cfg, corpus, batch_size))
        try:  # the first batch runs through the model while the database is set up
            head, seqs = first_sequences(seqs, batch_size, cfg.index_range)
            early = early_forward(self, head, lambda: setup.done() and (
                setup.error is not None or plan_skips(setup.value.plan, head)))
            s = setup.result()
        finally:
            setup.join()  # on an error here too: the setup's opening is closed before going on
        ids = [st.plan.source_id for st in s.states]
        seq_ids = SeqIds(s.plan.next_seq_id)
        rows = RowMaker(ids, s.keys, s.tokenizer_id, s.corpus_key, TokenStrings(self.tokenizer), seq_ids)
        batches = make_batches(seqs, s.plan, batch_size, seq_ids)
        # the new sources' rows go in with the first commit's (the first batch sets their thresholds)
        writers = Writers(db, rows, threads=cfg.writer_threads,
                          first_commit=lambda con: _write_new_sources(con, s.states))
        loop = self._stream(cfg, s.states, batches, writers, _total(cfg, s.plan), early, started)
        try:
            with session(db) as con:  # one opening for the writers' last commits and the statistics
                writers.close()
                loop.seconds = time.monotonic() - loop.started
                return self._finish(con, s.states, loop, cfg)
        except BaseException:
            _close_quietly(writers)
            raise

    def _setup(self, db, cfg: HarvestConfig, corpus: corpus_mod.Corpus, batch_size: int) -> _Setup:
        """Each source's state and storage key, and what the database already holds (one opening)."""
        from featurescribe.store.harvest_rows import harvest_source_keys

        tokenizer_id, corpus_key = corpus_mod.tokenizer_fingerprint(self.tokenizer), corpus.key(cfg.ctx)
        with session(db) as con:
            states = prepare_states(con, self, cfg, corpus, tokenizer_id, batch_size)
            plan = _plan(con, states, tokenizer_id, corpus_key, cfg.index_range)
            keys = harvest_source_keys(con, [st.plan.source_id for st in states])
        return _Setup(tokenizer_id, corpus_key, states, plan, keys)

    def _stream(self, cfg: HarvestConfig, states: list[SourceState], batches: Iterator[Batch], writers: Writers,
                total: int | None, early: EarlyBatch | None = None, started: float | None = None) -> _Loop:
        """Every batch through the model and into the writers' queue; the caller closes the writers
        (they are closed here only after an error). `early`: the first batch's pass, when it ran
        during the setup; `started`: when the loop's clock started (default: now)."""
        import torch

        from featurescribe.progress import Progress

        reader = Prefetch(batches)
        loop = _Loop(sequences=[0] * len(states), started=time.monotonic() if started is None else started)
        try:
            with Progress("harvest", total=total, unit="tok", enabled=cfg.progress) as bar, torch.inference_mode():
                for batch in reader:
                    stop_if_received()
                    item = self._item(batch, states, early.take(batch) if early is not None else None)
                    writers.put(item)
                    loop.tokens += batch.n_tokens
                    for k in range(len(states)):
                        loop.sequences[k] += int(batch.todo[k].sum()) if batch.todo is not None else len(batch.seq_ids)
                    bar.advance(batch.n_tokens)
        except BaseException:
            reader.close()
            _close_quietly(writers)  # keep what was computed: it is committed and a re-run continues after it
            raise
        reader.close()
        return loop

    def _finish(self, con, states: list[SourceState], loop: _Loop, cfg: HarvestConfig) -> list[HarvestResult]:
        """Every source's exact statistics (one pass over the stored entries) and its result."""
        from featurescribe.store.harvest_rows import finalize_sources

        for st in states:
            if st.threshold is None:  # nothing was left to run
                st.threshold = st.value if st.rule == "abs" else 0.0
        with transaction(con):
            _write_new_sources(con, states)
        rate = round(loop.tokens / loop.seconds, 1) if loop.seconds > 0 else None
        params = [dict(st.params, status="complete", seconds=round(loop.seconds, 3), tokens_per_s=rate)
                  for st in states]
        counts = finalize_sources(con, [(st.plan.source_id, st.plan.width, p) for st, p in zip(states, params)],
                                  FIRST_POS)
        if cfg.index_range is None and any(n_seq == 0 for n_seq, *_ in counts):
            raise FeaturescribeError(f"corpus {cfg.corpus} gave no sequences to harvest")
        return [self._result(st, loop, k, c) for k, (st, c) in enumerate(zip(states, counts))]

    def _result(self, st: SourceState, loop: _Loop, k: int, counts: tuple[int, int, int, int]) -> HarvestResult:
        n_seq, n_tok, n_act, alive = counts
        p = st.plan
        return HarvestResult(
            source_id=p.source_id, model_id=self.model_id, hook_name=p.hook_name, layer=p.layer, site=p.site,
            kind=p.kind, width=p.width, threshold=float(st.threshold), n_sequences=n_seq, n_tokens=n_tok,
            n_activations=n_act, new_sequences=loop.sequences[k], new_tokens=loop.tokens, seconds=loop.seconds,
            alive=alive)


def _close_quietly(writers: Writers) -> None:
    """Commit what the writers hold and stop them, after another error (the one to report)."""
    try:
        writers.close()
    except BaseException:  # noqa: BLE001
        pass


def _kept_mask(acts, valid, threshold: float):
    """[B, T, W] bool (a torch tensor or a numpy array, as `acts`): above the threshold at a
    harvested position (`valid` [B, T], or every position from FIRST_POS)."""
    mask = acts > threshold
    if valid is not None:
        mask &= valid[:, :, None]
    else:
        mask[:, :FIRST_POS] = False
    return mask


def _sparse_numpy(acts: np.ndarray, valid: np.ndarray | None, threshold: float):
    """`Harvester.sparse` of a float32 array on the CPU, where numpy's mask and flatnonzero take a
    third of torch's time (same entries, same order)."""
    B, T, W = acts.shape
    lin = np.flatnonzero(_kept_mask(acts, valid, threshold))
    bt, feature = np.divmod(lin, W)
    row, pos = np.divmod(bt, T)
    return np.stack([row, pos, feature], 1).astype(np.int32), acts.reshape(-1)[lin]


def _write_new_sources(con, states: list[SourceState]) -> None:
    """The `sources` rows of new sources whose threshold is set, inside the caller's transaction (the
    harvest's first commit, or the final statistics'). Another harvest may have created one
    meanwhile: with the same settings this one goes on beside it, with others it stops here, and
    the transaction writes nothing."""
    from featurescribe.store.harvest_rows import insert_sources, source_settings

    new = [st for st in states if not st.exists and st.threshold is not None]
    if not new:
        return
    stored = {st.plan.source_id: source_settings(con, st.plan.source_id) for st in new}
    for st in new:
        have = stored[st.plan.source_id]
        diffs = [] if have is None else settings_diffs(have, st.want, st.threshold)
        if diffs:
            raise FeaturescribeError(
                f"source {st.plan.source_id} was created meanwhile by another harvest, with "
                f"{'; '.join(diffs)}; run the command again to continue that harvest, or pass "
                "--source-id NEW_ID")
    insert_sources(con, [source_row(st) for st in new if stored[st.plan.source_id] is None])
    for st in new:
        st.exists = True


def _plan(con, states: list[SourceState], tokenizer_id: str, corpus_key: str, index_range) -> Plan:
    from featurescribe.store.harvest_rows import done_corpus_indices, known_sequences

    known_index, known_seq, nxt = known_sequences(con, tokenizer_id, corpus_key)
    done = done_corpus_indices(con, [st.plan.source_id for st in states], tokenizer_id, corpus_key)
    return Plan(known_index, known_seq, done, nxt, tuple(index_range) if index_range else (0, None))


def _total(cfg: HarvestConfig, plan: Plan) -> int | None:
    """Tokens the progress bar expects (whole sequences), when known."""
    if not cfg.max_tokens:
        return None
    n_seq = -(-cfg.max_tokens // cfg.ctx)
    lo, hi = plan.index_range
    n_seq = min(n_seq, hi if hi is not None else n_seq) - lo
    done = min(len(d) for d in plan.done_index) if plan.done_index else 0
    return max(n_seq - done, 0) * cfg.ctx


def _chain_first(first, rest):
    yield first
    yield from rest


def check_config(cfg: HarvestConfig) -> None:
    """The option checks that need no model."""
    parse_sites(cfg.site)
    parse_layers(cfg.layer, n_layers=1)
    if cfg.source_id is not None:
        check_source_id(cfg.source_id)
    if cfg.ctx < 2:
        raise BadOption("--ctx must be at least 2")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise BadOption("--batch-size must be at least 1")
    if cfg.max_tokens is not None and cfg.max_tokens < 0:
        raise BadOption("--max-tokens must be positive (0: the whole corpus)")
    if cfg.threshold is not None:
        parse_threshold(cfg.threshold)


def check_ctx(ctx: int, model) -> None:
    """Positions past the model's context are out of its training distribution, and attention's
    memory grows with ctx squared: such a --ctx is bad input, not a long run that fails later."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and ctx > limit:
        raise BadOption(f"--ctx {ctx:,} is longer than the model's context of {limit:,} tokens")


def load_model(cfg: HarvestConfig):
    """(model_id, model, tokenizer) for a config."""
    from featurescribe.harvest.models import load_causal_lm, pick_device, resolve_model, torch_dtype

    device = pick_device(cfg.device)
    torch_dtype(cfg.dtype)
    ref = resolve_model(cfg.model, progress=cfg.progress)
    model, tokenizer = load_causal_lm(ref, device=device, dtype=cfg.dtype)
    return ref.model_id, model, tokenizer


def harvest_all(cfg: HarvestConfig, loaded=None, *, one: bool = False) -> list[HarvestResult]:
    """Run a harvest from a config: one result per source. Every user error is raised before the
    database is opened. `loaded`: an optional `(model_id, model, tokenizer)` already in memory;
    `one`: refuse a harvest of several sources."""
    check_config(cfg)
    corpus = corpus_mod.open_corpus(cfg.corpus)
    saes = load_saes(cfg.sae_paths)
    model_id, model, tokenizer = loaded if loaded is not None else load_model(cfg)
    stop_if_received()  # a shard's thread: loading took a while
    check_ctx(cfg.ctx, model)
    h = Harvester(model, tokenizer, model_id=model_id, layer=cfg.layer, site=cfg.site, sae=saes,
                  source_id=cfg.source_id)
    if one and len(h.plans) != 1:
        raise FeaturescribeError(f"this harvest has {len(h.plans)} sources: use harvest_all")
    # the corpus is read and tokenized in a thread from here on, while the database is set up
    reader = Prefetch(corpus_mod.sequences(corpus, tokenizer, cfg.ctx, cfg.max_tokens or None), depth=SEQUENCES_AHEAD)
    try:
        seqs = iter(reader)
        first = next(seqs, None)
        if first is None and cfg.index_range is None:
            raise FeaturescribeError(f"corpus {cfg.corpus} is empty: it has no text to harvest")
        from featurescribe.store.connection import Database, lock_timeout, run_lock_timeout
        from featurescribe.store.memory import RUN_HEADROOM_MB

        # the first opening (the run's setup) creates and upgrades the file, or gives one clear line
        # (locked past --lock-timeout, too new, ...); later ones wait longer for the run's own writes
        db = Database(cfg.db, lock_timeout=run_lock_timeout(), memory_headroom_mb=RUN_HEADROOM_MB, create=True,
                      first_lock_timeout=lock_timeout())
        return h.run(db, cfg, corpus, first=first, seqs=seqs)
    finally:
        reader.close()
        return_freed_memory()  # what the heap kept for the next batch (keep_freed_memory_for_tensors)


def harvest(cfg: HarvestConfig, loaded=None) -> HarvestResult:
    """A harvest of one source (see `harvest_all` for many)."""
    return harvest_all(cfg, loaded, one=True)[0]
