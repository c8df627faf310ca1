"""`featurescribe harvest`: a model's activations at many sites and SAEs in one pass, into the database.

The options are the fields of `HarvestOptions` (harvest/options.py); `run_harvest` is what
`featurescribe.harvest(...)` runs too."""

from __future__ import annotations

import argparse
import os
import sys

from featurescribe.harvest.harvester import HarvestResult
from featurescribe.harvest.options import HarvestOptions
from featurescribe.options import add_option_arguments, options_from_args
from featurescribe.store.connection import DEFAULT_DB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    add_option_arguments(p, HarvestOptions)


def run_harvest(db: str | os.PathLike, options: HarvestOptions) -> list[HarvestResult]:
    """The harvest the options describe: one result per source."""
    cfg = options.config(str(db))
    if options.shards != 1:
        from featurescribe.harvest.shards import harvest_sharded

        if options.task_runner == "dask" and options.dask_address:
            from featurescribe.flows.runners import check_scheduler

            check_scheduler(options.dask_address)

        return harvest_sharded(cfg, options.shards, task_runner=options.task_runner, workers=options.workers,
                               dask_address=options.dask_address)
    from featurescribe.harvest.harvester import harvest_all

    loaded = (options.loaded_model_id, options.model, options.tokenizer) if options.in_memory else None
    return harvest_all(cfg, loaded)


def print_result(r: HarvestResult) -> None:
    dead = r.width - r.alive
    what = "SAE latents" if r.kind == "sae" else "units"
    print(f"{r.model_id} layer {r.layer} {r.site} ({r.hook_name}): {r.width:,} {what}, "
          f"threshold {r.threshold:.4g}")
    pct = 100.0 * r.n_activations / max(1, r.n_tokens * r.width)
    print(f"{r.n_activations:,} entries kept over {r.n_tokens:,} tokens ({pct:.2f}% dense); "
          f"{r.alive:,} features active, {dead:,} never above the threshold")
    print(f"source_id: {r.source_id}")


def run(args: argparse.Namespace) -> int:
    options = options_from_args(HarvestOptions, args)
    results = run_harvest(args.db, options)
    r0 = results[0]
    if r0.new_tokens:
        print(f"harvested {r0.new_tokens:,} tokens for {len(results)} source(s) from {options.corpus} "
              f"in {r0.seconds:.1f} s ({r0.tokens_per_s:,.0f} tokens/s)")
    else:
        print(f"nothing new to harvest: all {r0.n_sequences:,} sequences were done already")
    for r in results:
        print_result(r)
    sys.stdout.flush()
    return 0
