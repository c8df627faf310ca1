"""`harvest --shards N`: the corpus cut into N parts harvested in parallel, then merged exactly.

The planner (this process) checks everything first (sources, layers, SAE widths, existing shard
files), fixes each source's threshold (the stored one, or an `auto` one estimated on the first batch
exactly as a one-process harvest does), and cuts the corpus's sequences into N contiguous ranges.
Each shard then runs on the task runner (threads, or Dask worker processes, with CUDA one GPU per
shard) and writes its own file `DB.shards/shard-I-of-N.duckdb`. The merge copies every shard into
DB and computes the statistics from all entries, so they equal a one-process harvest's.

A shard that was killed keeps what it committed; running the same command again re-runs that shard
alone (finished shards are complete in their manifest) and then merges. Shard files from another
`--shards N` or other settings are refused before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest import corpus as corpus_mod
from featurescribe.harvest.harvester import (HarvestConfig, HarvestResult, Harvester, check_config, check_ctx,
                                             harvest_all, load_model)
from featurescribe.harvest.sae import load_saes


@dataclass
class ShardPlan:
    params: dict  # the HarvestConfig of the whole harvest, as a dict
    shards: int
    n_seq: int
    ranges: list[tuple[int, int]]
    thresholds: dict[str, float]
    settings: dict  # what every shard file and the merge must agree on
    sources: list[dict] = field(default_factory=list)  # per source: id, hook, layer, site, kind, width
    complete: bool = False  # every source already has every sequence in DB: nothing to run


def shard_dir(db: str) -> Path:
    return Path(f"{db}.shards")


def shard_path(db: str, index: int, shards: int) -> Path:
    return shard_dir(db) / f"shard-{index:03d}-of-{shards:03d}.duckdb"


def shard_ranges(n_seq: int, shards: int) -> list[tuple[int, int]]:
    return [(n_seq * i // shards, n_seq * (i + 1) // shards) for i in range(shards)]


def _settings(cfg: HarvestConfig, shards: int, n_seq: int, h: Harvester, thresholds: dict) -> dict:
    return {"model": h.model_id, "sources": [p.source_id for p in h.plans],
            "hooks": [p.hook_name for p in h.plans], "saes": [p.sae.path for p in h.plans if p.sae is not None],
            "corpus": corpus_mod.open_corpus(cfg.corpus).key(cfg.ctx), "max_tokens": cfg.max_tokens or 0,
            "ctx": cfg.ctx, "batch_size": cfg.batch_size, "dtype": cfg.dtype or "float32",
            "thresholds": thresholds, "shards": shards, "n_sequences": n_seq}


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k} {a.get(k)!r} (now {b.get(k)!r})" for k in keys)


def check_existing_shards(db: str, shards: int, settings: dict | None) -> list[dict]:
    """The manifests of the shard files already there; files of another N or other settings are an error."""
    from featurescribe.store import open_db
    from featurescribe.store.harvest_merge import read_manifest

    found = []
    for p in sorted(shard_dir(db).glob("shard-*.duckdb")):
        con = open_db(p)
        try:
            m = read_manifest(con)
        finally:
            con.close()
        if m is None:
            continue
        if m["shards"] != shards or p != shard_path(db, m["shard_index"], shards):
            raise FeaturescribeError(f"{p} belongs to a harvest in {m['shards']} shards, which would overlap "
                                     f"the {shards} asked for; re-run with --shards {m['shards']} or remove "
                                     f"{shard_dir(db)}")
        if settings is not None and m["settings"] != settings:
            raise FeaturescribeError(f"{p} was harvested with other settings ({_diff(m['settings'], settings)}); "
                                     f"re-run with the same options or remove {shard_dir(db)}")
        found.append(m)
    return found


def _count_sequences(cfg: HarvestConfig, tokenizer) -> int:
    corpus = corpus_mod.open_corpus(cfg.corpus)
    n = sum(1 for _ in corpus_mod.sequences(corpus, tokenizer, cfg.ctx, cfg.max_tokens or None))
    if n == 0:
        raise FeaturescribeError(f"corpus {cfg.corpus} is empty: it has no text to harvest")
    return n


def _thresholds(cfg: HarvestConfig, h: Harvester, n_seq: int) -> tuple[dict[str, float], bool]:
    """Each source's threshold: stored in DB, given, or estimated on the first batch (as one process does);
    and whether DB already holds every sequence of every source."""
    from featurescribe.harvest.batches import make_batches
    from featurescribe.harvest.harvester import _plan
    from featurescribe.harvest.source_state import prepare_states
    from featurescribe.store import open_db

    corpus = corpus_mod.open_corpus(cfg.corpus)
    tokenizer_id = corpus_mod.tokenizer_fingerprint(h.tokenizer)
    batch_size = cfg.batch_size or (128 if h.device.type == "cuda" else 32)
    con = open_db(cfg.db)
    try:
        states = prepare_states(con, h, cfg, corpus, tokenizer_id, batch_size)
        complete = all(len(d) >= n_seq for d in _plan(con, states, tokenizer_id, corpus.key(cfg.ctx), None).done_index)
        if any(st.threshold is None for st in states):
            seqs = corpus_mod.sequences(corpus, h.tokenizer, cfg.ctx, cfg.max_tokens or None)
            fresh = _plan(con, states, tokenizer_id, corpus.key(cfg.ctx), None)
            fresh.done_index = [fresh.done_index[0][:0] for _ in states]
            import torch

            with torch.inference_mode():
                h._item(next(make_batches(seqs, fresh, batch_size)), states)
    finally:
        con.close()
    return {st.plan.source_id: float(st.threshold) for st in states}, complete


def plan_shards(cfg: HarvestConfig, shards: int, loaded=None) -> ShardPlan:
    """Every check and the thresholds, before any shard runs."""
    if shards < 1:
        raise FeaturescribeError("--shards must be at least 1")
    check_config(cfg)
    corpus_mod.open_corpus(cfg.corpus)
    saes = load_saes(cfg.sae_paths)
    model_id, model, tokenizer = loaded if loaded is not None else load_model(cfg)
    check_ctx(cfg.ctx, model)
    h = Harvester(model, tokenizer, model_id=model_id, layer=cfg.layer, site=cfg.site, sae=saes,
                  source_id=cfg.source_id)
    n_seq = _count_sequences(cfg, tokenizer)
    if shards > n_seq:
        raise FeaturescribeError(f"--shards {shards} is more than the corpus's {n_seq} sequences")
    check_existing_shards(cfg.db, shards, None)
    thresholds, complete = _thresholds(cfg, h, n_seq)
    settings = _settings(cfg, shards, n_seq, h, thresholds)
    check_existing_shards(cfg.db, shards, settings)
    params = {k: v for k, v in asdict(cfg).items() if k not in ("index_range", "thresholds")}
    params.update(overwrite=False, progress=False)
    sources = [{"source_id": p.source_id, "hook_name": p.hook_name, "layer": p.layer, "site": p.site,
                "kind": p.kind, "width": p.width, "threshold": thresholds[p.source_id]} for p in h.plans]
    return ShardPlan(params, shards, n_seq, shard_ranges(n_seq, shards), thresholds, settings, sources, complete)


def _shard_device(device: str, index: int) -> str:
    from featurescribe.harvest.models import pick_device

    dev = pick_device(device)
    if dev == "cuda":
        import torch

        return f"cuda:{index % max(1, torch.cuda.device_count())}"
    return dev


def run_shard(plan: dict, index: int) -> dict:
    """Harvest one shard into its own file (resuming what it committed before); a complete one is skipped."""
    from featurescribe.store import open_db
    from featurescribe.store.harvest_merge import read_manifest, write_manifest

    p = ShardPlan(**plan)
    lo, hi = p.ranges[index]
    path = shard_path(p.params["db"], index, p.shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = open_db(path)
    try:
        m = read_manifest(con)
        if m is not None and m["status"] == "complete":
            return {"shard": index, "skipped": True, "new_tokens": 0}
        write_manifest(con, index, p.shards, lo, hi, p.settings, "running")
    finally:
        con.close()
    cfg = HarvestConfig(**{**p.params, "db": str(path), "device": _shard_device(p.params["device"], index)},
                        index_range=(lo, hi), thresholds=p.thresholds)
    results = harvest_all(cfg)
    con = open_db(path)
    try:
        write_manifest(con, index, p.shards, lo, hi, p.settings, "complete")
    finally:
        con.close()
    return {"shard": index, "skipped": False, "new_tokens": results[0].new_tokens, "seconds": results[0].seconds}


def merge(plan: dict) -> list[HarvestResult]:
    """Merge the complete shard files into the main database, compute exact statistics, remove the files."""
    from featurescribe.harvest.source_state import FIRST_POS
    from featurescribe.store import open_db
    from featurescribe.store.harvest_merge import merge_shard_files
    from featurescribe.store.harvest_rows import finalize_sources, source_params

    p = ShardPlan(**plan)
    db = p.params["db"]
    found = {m["shard_index"]: m for m in check_existing_shards(db, p.shards, p.settings)}
    # DB holds every sequence already: shard files left there (a merge stopped while it removed
    # them, or a later one-process harvest) add nothing, and are removed
    missing = [] if p.complete else [i for i in range(p.shards) if found.get(i, {}).get("status") != "complete"]
    if missing:
        raise FeaturescribeError(f"shard(s) {', '.join(map(str, missing))} of {p.shards} are not complete; "
                                 "run the same command again to finish them")
    paths = [shard_path(db, i, p.shards) for i in range(p.shards)]
    con = open_db(db)
    try:
        if found and not p.complete:
            merge_shard_files(con, paths)
        params = [{**source_params(con, s["source_id"]), "shards": p.shards, "status": "complete"}
                  for s in p.sources]
        counts = finalize_sources(con, [(s["source_id"], s["width"], q) for s, q in zip(p.sources, params)],
                                  FIRST_POS)
        out = [HarvestResult(model_id=p.settings["model"], n_sequences=n_seq, n_tokens=n_tok,
                             n_activations=n_act, new_sequences=0, new_tokens=0, seconds=0.0, alive=alive,
                             **{k: s[k] for k in ("source_id", "hook_name", "layer", "site", "kind",
                                                  "width", "threshold")})
               for s, (n_seq, n_tok, n_act, alive) in zip(p.sources, counts)]
    finally:
        con.close()
    for f in paths:
        f.unlink(missing_ok=True)
    if shard_dir(db).exists():
        shard_dir(db).rmdir()
    return out


def harvest_sharded(cfg: HarvestConfig, shards: int, *, task_runner: str = "thread", workers: int = 2,
                    dask_address: str | None = None, loaded=None) -> list[HarvestResult]:
    """Plan (every check first), run the shards on the task runner, merge. One result per source."""
    from featurescribe.flows.harvest_flow import harvest_shards_flow
    from featurescribe.flows.prefect_env import check_prefect_server

    check_prefect_server()  # before the plan, which loads the model
    plan = plan_shards(cfg, shards, loaded)
    return harvest_shards_flow(asdict(plan), task_runner=task_runner, workers=workers, dask_address=dask_address)
