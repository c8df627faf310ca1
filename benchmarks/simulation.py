"""All-at-once local simulation against one token at a time, on the same windows.

The all-at-once `local:smollm2-135m` simulator reads every slot of a window from one forward
pass. The reference does what a simulator without the placeholder trick must do: one forward
pass per token, over the same text cut right after that token's slot, reading that slot only.
Both see exactly the same token ids up to each slot, so their predictions must agree (checked:
`max_abs_diff`). The headline is the ratio of their wall times.

    python benchmarks/simulation.py --quick     # 2 windows of 12 tokens: 2 passes against 24
    python benchmarks/simulation.py             # 6 windows of 32 tokens: 6 passes against 192

The one-token-at-a-time side costs a forward pass per token, so it is almost all of the run
(--quick: about 15 s on 2 idle CPU cores). Both sides reuse the cached prompt prefix of the
local backend. The speedup is bounded by the window length (12 at --quick): compare figures
taken at the same size.

Last line: `simulation_speedup: X`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from featurescribe.llm import make_client  # noqa: E402
from featurescribe.testbed.planted import build_bed  # noqa: E402
from featurescribe.scorers.simulators import LocalSimulator  # noqa: E402


async def one_at_a_time(sim: LocalSimulator, explanation: str, tokens: list[str]) -> list[float]:
    text, positions = sim.build(explanation, tokens)
    out = []
    for i, p in enumerate(positions):
        # the text up to this token's slot: earlier slots hold the placeholder, as in one pass
        probs = await sim.window_probs(text[:p] + sim.SLOT, positions[: i + 1])
        out.append(sim.expected(probs[-1:])[0])
    return out


async def main_async(args) -> int:
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except Exception:
        pass
    bed = build_bed(tokenizer="auto", max_tokens=8000, window=args.window,
                    n_top={"explain": 1, "valid": 0, "test": args.windows},
                    n_random={"explain": 0, "valid": 0, "test": 0})
    plant = bed.plants[0]
    windows = bed.examples[("planted", plant.feature_id)].split("test")[: args.windows]
    client = make_client(f"local:{args.model}", use_cache=False)
    sim = LocalSimulator(client)
    await client.load()
    # warm up (and settle the model's scale: 0-9 for SmolLM2) outside the timings
    await sim.simulate_window(plant.explanation, windows[0])

    t0 = time.perf_counter()
    fast = [await sim.simulate_window(plant.explanation, w) for w in windows]
    t_all = time.perf_counter() - t0

    t0 = time.perf_counter()
    slow = [await one_at_a_time(sim, plant.explanation, w.tokens) for w in windows]
    t_one = time.perf_counter() - t0

    n_tok = sum(len(w.tokens) for w in windows)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(fast, slow))
    text, _ = sim.build(plant.explanation, windows[0].tokens)
    print(f"model: local:{args.model}  tokenizer of the windows: {bed.tokenizer}  torch threads: {torch_threads}")
    print(f"windows: {len(windows)} x {args.window} tokens ({n_tok} slots), prompt+window text "
          f"{len(text)} chars")
    print(f"all_at_once_s_per_window: {t_all / len(windows):.3f}")
    print(f"one_at_a_time_s_per_window: {t_one / len(windows):.3f}")
    print(f"forward_passes_all_at_once: {len(windows)}  forward_passes_one_at_a_time: {n_tok}")
    print(f"max_abs_diff: {diff:.2e}")
    if diff > 1e-3:
        print("the two simulators disagree: the speedup compares different computations", file=sys.stderr)
        return 1
    print(f"simulation_speedup: {t_one / t_all:.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 windows of 12 tokens")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    args = ap.parse_args()
    args.windows = args.windows or (2 if args.quick else 6)
    args.window = args.window or (12 if args.quick else 32)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
