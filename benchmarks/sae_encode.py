"""What an SAE's encoder adds to the forward pass, per checkpoint format.

    python benchmarks/sae_encode.py --quick       # CPU: 4 rounds x 2k tokens, about a minute on 2 free cores
    python benchmarks/sae_encode.py --device cuda --dtype bfloat16

The same batches of builtin:stdlib go through `Harvester.features` (the per-batch device work of a
harvest, without sparsification or the writer) of smollm2-135m at layer 6's MLP input, read as
(a) plain units and through (b) a sparsify TopK transcoder at `layers.6.mlp`, (c) the same as
groupmax and (d) a SAELens JumpReLU transcoder on `blocks.6.ln2.hook_normalized`, all with 32 x 576
= 18,432 random latents (k = 32), written to a temporary folder in each format's layout and loaded
through `load_sae`. Rounds interleave the four so that each sees the same machine load. Prints
tokens/s for each and `<format>_vs_forward` (tokens/s with the encoder / without); the last line is
`sparsify_topk_vs_forward`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYER, D_IN, LATENTS, K = 6, 576, 32 * 576, 32


def write_checkpoints(folder: Path) -> dict[str, Path]:
    """Random-weight checkpoints in sparsify's and SAELens' layouts."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    enc = torch.randn(LATENTS, D_IN, generator=g) / D_IN ** 0.5
    out = {}
    for name, activation in (("sparsify_topk", "topk"), ("sparsify_groupmax", "groupmax")):
        d = folder / name / f"layers.{LAYER}.mlp"
        d.mkdir(parents=True)
        (d / "cfg.json").write_text(json.dumps({"activation": activation, "num_latents": LATENTS, "k": K,
                                                "transcode": True, "d_in": D_IN}))
        save_file({"encoder.weight": enc, "encoder.bias": torch.zeros(LATENTS),
                   "W_dec": torch.zeros(LATENTS, D_IN), "b_dec": torch.zeros(D_IN)}, str(d / "sae.safetensors"))
        out[name] = d
    d = folder / "saelens_jumprelu_transcoder"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps({"architecture": "jumprelu_transcoder", "d_in": D_IN, "d_sae": LATENTS,
                                            "d_out": D_IN, "metadata": {"hook_name": f"blocks.{LAYER}.ln2.hook_normalized"}}))
    save_file({"W_enc": enc.T.contiguous(), "b_enc": torch.zeros(LATENTS), "W_dec": torch.zeros(LATENTS, D_IN),
               "b_dec": torch.zeros(D_IN), "threshold": torch.full((LATENTS,), 0.5)}, str(d / "sae_weights.safetensors"))
    out["saelens_jumprelu_transcoder"] = d
    return out


def batches(tokenizer, n_tokens: int, ctx: int, batch_size: int):
    import numpy as np
    import torch

    from featurescribe.harvest import corpus as corpus_mod

    seqs = corpus_mod.sequences(corpus_mod.open_corpus("builtin:stdlib"), tokenizer, ctx, n_tokens)
    ids = [s.token_ids for s in seqs if len(s.token_ids) == ctx]  # whole sequences: no padding to weigh
    return [torch.from_numpy(np.stack(ids[i:i + batch_size]).astype(np.int64))
            for i in range(0, len(ids), batch_size)]


def main() -> int:
    import torch

    from featurescribe.harvest.harvester import Harvester
    from featurescribe.harvest.models import load_causal_lm, pick_device

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    n_tokens, rounds = (2048, 4) if args.quick else (16384, 4)
    if device != "cpu":
        n_tokens *= 64
    model, tokenizer = load_causal_lm("smollm2-135m", device=device, dtype=args.dtype)
    data = [b.to(device) for b in batches(tokenizer, n_tokens, 64, 32 if device == "cpu" else 128)]
    with tempfile.TemporaryDirectory() as tmp:
        saes = write_checkpoints(Path(tmp))
        runners = {"forward": Harvester(model, tokenizer, model_id="smollm2-135m", layer=LAYER, site="mlp_in")}
        for name, folder in saes.items():
            runners[name] = Harvester(model, tokenizer, model_id="smollm2-135m", layer=LAYER, sae=str(folder))
        seconds = {name: 0.0 for name in runners}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, h in runners.items():
                    t0 = time.perf_counter()
                    for ids in data:
                        h.features(ids)
                    if device != "cpu":
                        torch.cuda.synchronize()
                    seconds[name] += time.perf_counter() - t0
    tokens = rounds * sum(b.numel() for b in data)
    for name, s in seconds.items():
        print(f"{name}_tokens_per_s: {tokens / s:.0f}")
    for name in saes:
        print(f"{name}_vs_forward: {seconds['forward'] / seconds[name]:.3f}")
    print(f"sparsify_topk_vs_forward: {seconds['forward'] / seconds['sparsify_topk']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
