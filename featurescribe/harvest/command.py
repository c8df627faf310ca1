"""`featurescribe harvest`: a model's activations at many sites and SAEs in one pass, into the database."""

from __future__ import annotations

import argparse
import sys

from featurescribe.harvest.harvester import DEFAULT_CTX, DEFAULT_MAX_TOKENS, HarvestConfig, HarvestResult
from featurescribe.harvest.sites import SITES
from featurescribe.store.connection import DEFAULT_DB


def _int(text: str) -> int:
    try:
        return int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from featurescribe.flows.runners import add_runner_arguments

    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--model", required=True,
                   help="smollm2-135m, gemma3-270m (offline, from their PyPI packages), a local model "
                        "directory, or a hub name (needs a network)")
    p.add_argument("--layer", default=None,
                   help="decoder layers, 0-based: 6, 3,6,9, 0-29 or all (needed unless --sae is given)")
    p.add_argument("--site", default=None,
                   help=f"comma list of {', '.join(SITES)}. mlp: MLP neurons (input of the down projection; "
                        "default), resid: residual stream after the layer, attn: attention output, mlp_out: "
                        "MLP output, mlp_in: MLP input (after its norm; what transcoders read). With --sae and no --site "
                        "only the SAEs are harvested")
    p.add_argument("--sae", metavar="DIR", action="append", default=None,
                   help="an SAE or transcoder folder, SAELens (cfg.json + sae_weights.safetensors) or EleutherAI "
                        "sparsify (cfg.json + sae.safetensors in a folder named by its hookpoint, e.g. layers.6), "
                        "or a folder of such folders; repeat for more. Each is read at the hook its config "
                        "names, in the same forward pass")
    p.add_argument("--corpus", default="builtin:stdlib",
                   help="a .txt file or folder, .jsonl (field text), .parquet (column text), or "
                        "builtin:stdlib (default)")
    p.add_argument("--max-tokens", type=_int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to harvest, rounded up to whole sequences (default {DEFAULT_MAX_TOKENS:,}; "
                        "0: the whole corpus)")
    p.add_argument("--ctx", type=_int, default=DEFAULT_CTX, help=f"tokens per sequence (default {DEFAULT_CTX})")
    p.add_argument("--batch-size", type=_int, default=None, help="sequences per forward pass (default 32 on CPU, 128 on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): CUDA when torch sees a GPU, else the CPU")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model weights and activations (default float32; bfloat16 is faster on GPUs)")
    p.add_argument("--threshold", default=None,
                   help="keep entries above this value: a number, 'auto' (keep about 1%% of entries, "
                        "estimated on the first batch; the default for neuron sites) or 'N%%'; SAE latents "
                        "default to 0 (keep every non-zero)")
    p.add_argument("--source-id", default=None,
                   help="the source id to write when the harvest has one source (default: '{layer}-{set}', "
                        "e.g. 6-mlp, 6-res-sae4k)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete these sources' activations and features first, and harvest again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--shards", type=_int, default=1,
                   help="cut the corpus into N parts harvested in parallel on --task-runner (each writes its "
                        "own file under DB.shards/, merged into --db at the end; default 1: one process)")
    add_runner_arguments(p)


def config_of(args: argparse.Namespace) -> HarvestConfig:
    return HarvestConfig(
        db=args.db, model=args.model, layer=args.layer, site=args.site, sae=args.sae, corpus=args.corpus,
        max_tokens=args.max_tokens, ctx=args.ctx, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, threshold=args.threshold, source_id=args.source_id, overwrite=args.overwrite,
        progress=not args.no_progress,
    )


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
    cfg = config_of(args)
    if args.shards > 1 or args.shards < 1:
        from featurescribe.harvest.shards import harvest_sharded

        results = harvest_sharded(cfg, args.shards, task_runner=args.task_runner, workers=args.workers,
                                  dask_address=args.dask_address)
    else:
        from featurescribe.harvest.harvester import harvest_all

        results = harvest_all(cfg)
    r0 = results[0]
    if r0.new_tokens:
        print(f"harvested {r0.new_tokens:,} tokens for {len(results)} source(s) from {cfg.corpus} "
              f"in {r0.seconds:.1f} s ({r0.tokens_per_s:,.0f} tokens/s)")
    else:
        print(f"nothing new to harvest: all {r0.n_sequences:,} sequences were done already")
    for r in results:
        print_result(r)
    sys.stdout.flush()
    return 0
