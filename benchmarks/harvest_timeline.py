"""Where a CPU harvest's time goes beside its forward passes (the profile behind `harvest_vs_forward`).

    python benchmarks/harvest_timeline.py [--rounds 4] [--tokens 32768]

Each round runs the bare forward pass of benchmarks/harvest.py (smollm2-135m to layer 6's MLP,
pre-made batches of 32 x 64 tokens) and then a whole harvest of the same sequences into a new file,
in one process after a warm-up. For the harvest it prints, from wrapped timings: when its first
forward pass started, that pass (the early pass, beside the database setup), the other batches'
passes, and the end (last batch done to the harvest's return). It also prints CPU seconds by
thread: the main thread and torch's native threads (from /proc/self/task, the bare pass's
subtracted) and each Python thread the harvest starts (setup, readers, writers).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harvest as bench  # noqa: E402 - benchmarks/harvest.py: the model, batches and bare pass

TIMES: list[tuple[str, float, float]] = []  # (what, start, end) of the wrapped calls
THREAD_CPU: collections.Counter = collections.Counter()  # Python thread name (no index) -> CPU s


def wrap(owner, name: str) -> None:
    real = getattr(owner, name)

    def timed_call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            TIMES.append((name, t0, time.perf_counter()))

    setattr(owner, name, timed_call)


def count_thread_cpu() -> None:
    """Each Python thread adds its CPU time to THREAD_CPU when it ends."""
    real = threading.Thread.run

    def run(self):
        try:
            real(self)
        finally:
            THREAD_CPU[self.name.rstrip("0123456789").rstrip("-")] += time.thread_time()

    threading.Thread.run = run


def native_cpu() -> float:
    """CPU seconds of this process's live threads other than the main one (torch's OpenMP pool)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def bare_round(h, batches) -> dict:
    import torch

    per_batch, cpu0, main0 = [], native_cpu(), time.thread_time()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            s = time.perf_counter()
            ids, _ = h.to_device(b)
            h.reader.run(ids)
            per_batch.append(time.perf_counter() - s)
    return {"wall": time.perf_counter() - t0, "median": sorted(per_batch)[len(per_batch) // 2],
            "main_cpu": time.thread_time() - main0, "native_cpu": native_cpu() - cpu0}


def harvest_round(db: str, tokens: int, loaded) -> dict:
    from featurescribe.harvest.harvester import harvest

    device, model, tok = loaded
    TIMES.clear()
    THREAD_CPU.clear()
    cpu0, main0 = native_cpu(), time.thread_time()
    t0 = time.perf_counter()
    harvest(bench.cfg_for(db, tokens, 32, None, device), loaded=(bench.MODEL, model, tok))
    end = time.perf_counter()
    items = [(a, b) for name, a, b in TIMES if name == "_item"]
    early = next(((a, b) for name, a, b in TIMES if name == "early_forward"), (t0, t0))
    return {"wall": end - t0, "to_first_pass": early[0] - t0, "early": early[1] - early[0],
            "items": sum(b - a for a, b in items), "n_items": len(items), "end": end - max(b for _, b in items),
            "main_cpu": time.thread_time() - main0, "native_cpu": native_cpu() - cpu0, "threads": dict(THREAD_CPU)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32_768)
    args = ap.parse_args()
    from featurescribe.harvest import harvester

    for name in ("_item", "_finish"):
        wrap(harvester.Harvester, name)
    wrap(harvester, "early_forward")
    count_thread_cpu()
    loaded = bench.load("cpu", None)
    h = harvester.Harvester(loaded[1], loaded[2], model_id=bench.MODEL, layer=bench.LAYER, site=bench.SITE)
    batches = bench.make_batches(loaded[2], args.tokens, 32)
    with tempfile.TemporaryDirectory() as tmp:
        harvest_round(str(Path(tmp) / "warm.duckdb"), 2048, loaded)
        bench.bare_forward(h, batches[:2], "cpu")
        for r in range(args.rounds):
            b, v = bare_round(h, batches), harvest_round(str(Path(tmp) / f"r{r}.duckdb"), args.tokens, loaded)
            print(f"round {r + 1}: bare {b['wall']:.2f} s (batch median {b['median']:.3f} s), harvest "
                  f"{v['wall']:.2f} s (ratio {b['wall'] / v['wall']:.3f}): first pass starts {v['to_first_pass']:.3f} s "
                  f"in, early pass {v['early']:.3f} s, other {v['n_items'] - 1} batches {v['items']:.2f} s, "
                  f"end {v['end']:.3f} s")
            threads = ", ".join(f"{k} {s:.2f}" for k, s in sorted(v["threads"].items()))
            print(f"  CPU s beyond the bare pass: main {v['main_cpu'] - b['main_cpu']:+.2f}, native "
                  f"{v['native_cpu'] - b['native_cpu']:+.2f}; Python threads: {threads}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
