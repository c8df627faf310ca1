"""Harvest throughput against a bare forward pass, and peak memory against corpus size.

    python benchmarks/harvest.py --quick                      # CPU: 2 x 8k tokens, about 2 minutes on 2 free cores
    python benchmarks/harvest.py --device cuda --dtype bfloat16   # GPU: 2 x 1M tokens with --quick

1. Speed: the same sequences of builtin:stdlib go through (a) a bare forward pass of smollm2-135m
   up to layer 6's MLP neurons (the model stops at the hooked module; nothing is kept) and (b) the
   whole harvest (reader thread, forward, device-side sparsification, Arrow, DuckDB writer thread,
   final SQL stats), in interleaved rounds (2 by default) so both see the same machine load.
   Prints `forward_tokens_per_s`, `harvest_tokens_per_s`, the same ratio in CPU time (robust when
   other processes share the machine) and `harvest_vs_forward: RATIO` in wall time (goal >= 0.9).
2. Memory: two fresh processes harvest N and 4N tokens (layer 0 with `--threshold 5%`, so many
   rows reach DuckDB quickly); each samples its RSS (and on CUDA the peak allocated GPU memory) while
   harvesting, and reports the peak above what it used before the harvest began (the loaded model
   after one forward pass). Prints `harvest_memory_growth: RATIO` = peak(4N) / peak(N) (goal <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --model picks another model (a local directory too); children read it from the environment
MODEL = os.environ.get("FEATURESCRIBE_BENCH_MODEL", "smollm2-135m")
LAYER, SITE, CORPUS = 6, "mlp", "builtin:stdlib"
MEM_LAYER = 0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every few milliseconds in a thread; `.peak` is the highest seen."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def load(device: str, dtype: str | None):
    from featurescribe.harvest.models import load_causal_lm, pick_device

    device = pick_device(device)
    model, tok = load_causal_lm(MODEL, device=device, dtype=dtype)
    return device, model, tok


def cfg_for(db: str, tokens: int, batch_size: int, dtype: str | None, device: str, layer: int = LAYER,
            threshold: str | None = None):
    from featurescribe.harvest.harvester import HarvestConfig

    return HarvestConfig(db=db, model=MODEL, layer=layer, site=SITE, corpus=CORPUS, max_tokens=tokens,
                         ctx=64, batch_size=batch_size, device=device, dtype=dtype, threshold=threshold,
                         progress=False)


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(h, batches, device: str) -> tuple[int, float, float]:
    """(tokens, wall s, process CPU s) of the forward pass to the site alone, on pre-made batches."""
    import torch

    n = 0
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in batches:
            ids, _ = h.to_device(b)
            h.reader.run(ids)
            n += b.n_tokens
    sync(device)
    return n, time.perf_counter() - t0, time.process_time() - c0


def speed(args) -> dict:
    """Rounds of (bare forward, whole harvest) on the same sequences, interleaved so that both see
    the same machine; ratios of the summed times."""
    import numpy as np

    from featurescribe.harvest import corpus as corpus_mod
    from featurescribe.harvest.harvester import Batch, Harvester, harvest

    device, model, tok = load(args.device, args.dtype)
    bs = args.batch_size or (128 if device.startswith("cuda") else 32)
    h = Harvester(model, tok, model_id=MODEL, layer=LAYER, site=SITE)
    c = corpus_mod.open_corpus(CORPUS)
    seqs = list(corpus_mod.sequences(c, tok, 64, args.tokens))
    batches = [Batch(np.arange(i, i + len(chunk)), np.arange(i, i + len(chunk)), [s.token_ids for s in chunk],
                     np.ones(len(chunk), bool)) for i in range(0, len(seqs), bs) for chunk in [seqs[i:i + bs]]]
    bare_forward(h, batches[:2], device)  # warm up
    fwd = [0, 0.0, 0.0]
    hv = [0, 0.0, 0.0]
    entries = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r_i in range(args.rounds):
            n, w, cpu = bare_forward(h, batches, device)
            fwd = [fwd[0] + n, fwd[1] + w, fwd[2] + cpu]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()  # the whole harvest: opening the db to the stats
            r = harvest(cfg_for(str(Path(tmp) / f"b{r_i}.duckdb"), args.tokens, bs, args.dtype, device),
                        loaded=(MODEL, model, tok))
            hv = [hv[0] + r.new_tokens, hv[1] + time.perf_counter() - t0, hv[2] + time.process_time() - c0]
            entries = r.n_activations
    return {"device": device, "dtype": str(model.dtype).replace("torch.", ""), "batch_size": bs,
            "tokens": hv[0] // args.rounds, "rounds": args.rounds, "entries": entries,
            "forward_tokens_per_s": fwd[0] / fwd[1], "harvest_tokens_per_s": hv[0] / hv[1],
            "ratio": (hv[0] / hv[1]) / (fwd[0] / fwd[1]), "cpu_ratio": (hv[0] / hv[2]) / (fwd[0] / fwd[2])}


def memory_child(args) -> dict:
    """One process, one harvest of args.tokens tokens: the peak memory above the loaded model."""
    import torch

    from featurescribe.harvest.harvester import harvest

    from featurescribe.harvest.harvester import Harvester

    device, model, tok = load(args.device, args.dtype)
    bs = args.batch_size or (128 if device.startswith("cuda") else 32)
    cuda = device.startswith("cuda")
    # one forward pass of a full batch first, so the allocator's warm-up is not counted as harvest memory
    h = Harvester(model, tok, model_id=MODEL, layer=MEM_LAYER, site=SITE)
    h.reader.run(torch.zeros((bs, 64), dtype=torch.long, device=device))
    del h
    import duckdb  # noqa: F401 - imported before the baseline too: module memory is not harvest memory
    import pyarrow  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu0 = torch.cuda.memory_allocated()
        before = rss_bytes()
        with PeakRSS() as peak:
            r = harvest(cfg_for(str(Path(tmp) / "m.duckdb"), args.tokens, bs, args.dtype, device,
                                layer=MEM_LAYER, threshold="5%"), loaded=(MODEL, model, tok))
        out = {"tokens": r.new_tokens, "entries": r.n_activations, "rss_before": before,
               "rss_extra": peak.peak - before}
        if cuda:
            out["gpu_extra"] = torch.cuda.max_memory_allocated() - gpu0
    return out


def run_child(tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", "--tokens", str(tokens), "--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"memory child for {tokens} tokens failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes on 2 CPU cores)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per round of the speed test")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of forward and harvest")
    ap.add_argument("--mem-tokens", type=int, default=None, help="N for the memory test (N and 4N tokens)")
    ap.add_argument("--model", default=None, help="model to harvest (default smollm2-135m)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model:
        global MODEL
        MODEL = os.environ["FEATURESCRIBE_BENCH_MODEL"] = args.model
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    from featurescribe.harvest.models import pick_device

    gpu = pick_device(args.device).startswith("cuda")
    if args.tokens is None:
        # on a GPU the forward pass runs ~10^6 tokens/s: a round must last seconds, or the fixed costs
        # (database open, final statistics) are all that is measured
        args.tokens = (1_000_000 if args.quick else 4_000_000) if gpu else (8_192 if args.quick else 32_768)
    if args.batch_size is None and not gpu:
        args.batch_size = 16  # more, smaller batches: the pipeline's fill and drain weigh less
    s = speed(args)
    print(f"device: {s['device']} {s['dtype']}, batch {s['batch_size']} x 64 tokens, {s['rounds']} rounds of "
          f"{s['tokens']:,} tokens, {s['entries']:,} entries kept per harvest")
    print(f"forward_tokens_per_s: {s['forward_tokens_per_s']:.0f}")
    print(f"harvest_tokens_per_s: {s['harvest_tokens_per_s']:.0f}  (the whole harvest: database open to final stats)")
    print(f"harvest_vs_forward_cpu_time: {s['cpu_ratio']:.3f}  (tokens per CPU-second, all threads)")
    print(f"harvest_vs_forward: {s['ratio']:.3f}", flush=True)
    n = args.mem_tokens or ((250_000 if args.quick else 1_000_000) if gpu else (10_000 if args.quick else 40_000))
    small, large = run_child(n, args), run_child(4 * n, args)
    mib = 1 << 20
    print(f"memory (layer {MEM_LAYER}, threshold 5%): {small['tokens']:,} tokens, {small['entries']:,} entries "
          f"-> +{small['rss_extra'] / mib:.0f} MiB RSS; {large['tokens']:,} tokens, {large['entries']:,} entries "
          f"-> +{large['rss_extra'] / mib:.0f} MiB RSS (model loaded: {small['rss_before'] / mib:.0f} MiB)")
    ratios = [large["rss_extra"] / max(small["rss_extra"], 1)]
    if "gpu_extra" in small:
        print(f"gpu memory: +{small['gpu_extra'] / mib:.0f} MiB -> +{large['gpu_extra'] / mib:.0f} MiB")
        print(f"harvest_gpu_memory_growth: {large['gpu_extra'] / max(small['gpu_extra'], 1):.3f}")
    print(f"harvest_memory_growth: {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
