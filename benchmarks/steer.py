"""Steering speed: steered generation against plain generation of the same model, in one run.

SmolLM2-135M (offline), a batch of neutral prompts, greedy, the same number of new tokens for
every row (no early stop). Three ways, interleaved round by round so that a noisy machine hits
them alike:

- `plain`: transformers' own `model.generate` (greedy, key/value cache), no hook;
- `loop`: featurescribe's generation loop (`steer.generate.Steerer`) with no intervention;
- `steered`: the same loop with an MLP neuron of layer 3 clamped in every row (`clamp`), and
  with a direction added to the residual stream after layer 20 (`add`).

Figures: tokens per second of each (median over rounds), and per round the ratio steered / plain
in wall time and in CPU time of this process (CPU time is what other jobs on a shared machine
disturb least); the medians of those ratios are the results. Then the intervention scorer's cost
per feature: forward passes and seconds of the calibration and the generation (lexical judge, no
LLM tokens), on the planted bed of output directions.

    python benchmarks/steer.py --quick     # 8 prompts x 16 tokens, 3 rounds; scorer cost on 3 plants
    python benchmarks/steer.py             # 16 prompts x 32 tokens, 7 rounds; 5 plants
    python benchmarks/steer.py --device cuda

Last line: `steer_vs_generate: R` (steered tokens/s over plain `generate` tokens/s, wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fig(name: str, value) -> None:
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def hf_generate(model, steerer, prompts, n_new):
    import torch

    ids, mask = steerer.encode(prompts)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                       do_sample=False, pad_token_id=steerer.pad_id)


def setup(args):
    from featurescribe.llm.backends.local import get_local_model
    from featurescribe.steer.calibrate import neutral_prompts
    from featurescribe.steer.generate import Steerer
    from featurescribe.steer.hooks import Intervention, hook_point
    from featurescribe.steer.planted import default_output_plants, plant_direction

    local = get_local_model(args.model, device=args.device)
    model, tok = local.model, local.tokenizer
    prompts = (neutral_prompts(16) * 2)[:args.prompts]
    neuron = Steerer(model, tok, hook_point(model, "mlp", 3))
    resid = Steerer(model, tok, hook_point(model, "resid", 20))
    d = plant_direction(model, tok, default_output_plants()[0]).to(resid.device)
    clamp = Intervention("clamp", 1.0, unit=7)
    add = Intervention("add", 100.0, direction=d)
    n = len(prompts)
    eos = tok.eos_token_id
    tok.eos_token_id = None  # every row generates all the tokens, as min_new_tokens makes generate do
    runs = {
        "plain": lambda: hf_generate(model, neuron, prompts, args.tokens),
        "loop": lambda: neuron.generate(prompts, max_new_tokens=args.tokens),
        "clamp": lambda: neuron.generate(prompts, clamp, [4.0] * n, max_new_tokens=args.tokens),
        "add": lambda: resid.generate(prompts, add, [1.0] * n, max_new_tokens=args.tokens),
    }
    return local, runs, n, eos


def speed(args) -> float:
    local, runs, n, eos = setup(args)
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, fn in runs.items():
            w, c = timed(fn)
            wall[k].append(w)
            cpu[k].append(c)
    local.tokenizer.eos_token_id = eos
    tokens = n * args.tokens
    print(f"# {n} prompts x {args.tokens} new tokens, greedy, {args.rounds} rounds, device {args.device}")
    for k in runs:
        fig(f"{k}_tokens_per_s", tokens / statistics.median(wall[k]))
    ratios = {}
    for k in ("loop", "clamp", "add"):
        ratios[k] = statistics.median(p / s for p, s in zip(wall["plain"], wall[k]))
        fig(f"{k}_vs_generate_cpu", statistics.median(p / s for p, s in zip(cpu["plain"], cpu[k])))
        fig(f"{k}_vs_generate", ratios[k])
    return min(ratios["clamp"], ratios["add"])


def scorer_cost(args) -> None:
    from featurescribe.llm.backends.local import get_local_model
    from featurescribe.scorers.intervention import InterventionConfig, LexicalPairJudge, score_intervention
    from featurescribe.steer.planted import build_output_bed

    from featurescribe.steer.planted import default_output_plants

    bed = build_output_bed(get_local_model(args.model, device=args.device), config=InterventionConfig(),
                           plants=default_output_plants()[:args.plants])
    t0 = time.perf_counter()

    async def run():
        return [await score_intervention(e, bed.steering, LexicalPairJudge())
                for e in bed.explanations() if e.method == "true"]

    res = asyncio.run(run())
    took = time.perf_counter() - t0
    passes = [r.details["forward_passes"] for r in res]
    print(f"# intervention scorer, {len(res)} planted features, 8 prompts x 12 tokens, target KL 2: "
          f"{statistics.mean(passes):.1f} forward passes per feature (calibration: one batch of 9 strengths "
          f"+ up to 4 bisection steps; generation: 12 passes of 16 rows), lexical judge (0 LLM tokens)")
    fig("intervention_forward_passes_per_feature", float(statistics.mean(passes)))
    fig("intervention_s_per_feature", took / len(res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.prompts, args.tokens, args.rounds = (8, 16, 3) if args.quick else (16, 32, 7)
    args.plants = 3 if args.quick else 5
    print(f"# load average before: {os.getloadavg()[0]:.1f} (a shared machine slows every figure alike)")
    scorer_cost(args)
    ratio = speed(args)
    fig("steer_vs_generate", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
