"""Harvest benchmarks: the store's ingest rate, harvest speed against a bare forward pass (one
source, and all 30 MLP layers in one pass), sharded speedup, and peak memory against corpus size.

    python benchmarks/harvest.py --quick     # CPU, about 5 minutes on 2 free cores
    python benchmarks/harvest.py --gpu       # one GPU: bfloat16, sizes where the forward runs >= 10 s
    bash benchmarks/gpu_prepare.sh           # here: gpu-model/ (config + tokenizer) and .whl/ to carry
    bash benchmarks/gpu_run.sh               # there: --gpu --quick --model gpu-model (random weights)

1. `store_ingest_entries_per_s`: synthetic SAE-shaped batches (16,384 latents, 64 kept per token)
   through the harvest's writers into `activations` (benchmarks/harvest_store.py); the same items
   with one commit per batch, DuckDB's bare Arrow insert of the columns, and the writers with 1,
   2, 4 and 8 threads (as many as there are cores), in the same run.
2. `harvest_vs_forward`: the same sequences of builtin:stdlib go through (a) a bare forward pass of
   smollm2-135m up to layer 6's MLP neurons and (b) the whole harvest (reader thread, forward,
   device-side sparsification, writer threads, final SQL stats), in interleaved rounds, so both see
   the same machine load; also in CPU time (robust when other processes share the machine). On a
   GPU a round is sized by a timed probe so that its forward pass lasts about 12 s (30 s without
   --quick), over builtin:stdlib's documents repeated when its ~2M tokens are too few. Both are
   warmed up first, the forward pass with two batches and the harvest with two one-batch
   harvests; the first harvest's one-time cost in a process is `first_harvest_extra_s`.
3. `multisite_vs_deepest_forward`: all 30 MLP layers harvested in one pass against a bare forward
   pass to layer 29, and the same 30 sources harvested one by one, as before this change.
4. `shard_speedup`: the layer-6 harvest as 3 shards on 3 local Dask worker processes against 1
   shard on 1 (wall time, worker start and model loads included; and the streaming part alone).
5. `harvest_memory_growth`: fresh processes harvest N and 4N tokens (layer 0, `--threshold 5%`,
   so many rows reach DuckDB), 3 of each in turns on the CPU (`--mem-repeats`; 1 with `--gpu`);
   each samples its RSS (and on CUDA the GPU memory) while harvesting, above what it used before
   (the loaded model, every weight page read, after one forward pass): median peak(4N) / median
   peak(N). N is large enough that both runs fill the writers' staging buffers.
The last line is the headline, `harvest_vs_forward`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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
# a GPU round at most: the command's 10-minute limit holds 2 rounds of reading, forward, writing
GPU_MAX_ROUND_TOKENS = 40_000_000


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
    from featurescribe.native_memory import keep_freed_memory_for_tensors

    device = pick_device(device)
    if device == "cpu":
        keep_freed_memory_for_tensors()  # as a harvest does: the bare forward pass runs with the same heap
    folder = Path(MODEL)
    if folder.is_dir() and (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        return device, *random_model(folder, device, dtype)
    model, tok = load_causal_lm(MODEL, device=device, dtype=dtype)
    return device, model, tok


def random_model(folder: Path, device: str, dtype: str | None):
    """A model of the folder's config with random weights (seeded), and its tokenizer: the GPU run's
    stand-in when the 98 MB model package cannot travel (`--write-model-config DIR` writes the folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from featurescribe.harvest.models import torch_dtype

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.to(device=device, dtype=torch_dtype(dtype) or torch.float32).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


def write_model_config(out: str) -> None:
    """Config and tokenizer of smollm2-135m (about 3.5 MB, no weights) into `out`, for random_model."""
    import shutil

    from featurescribe.harvest.models import resolve_model

    src = Path(resolve_model("smollm2-135m").path)
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, Path(out) / name)


def cfg_for(db: str, tokens: int, batch_size: int, dtype: str | None, device: str, layer: int = LAYER,
            threshold: str | None = None, corpus: str = CORPUS):
    from featurescribe.harvest.harvester import HarvestConfig

    return HarvestConfig(db=db, model=MODEL, layer=layer, site=SITE, corpus=corpus, max_tokens=tokens,
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


def make_batches(tok, tokens: int, bs: int, corpus: str = CORPUS):
    import numpy as np

    from featurescribe.harvest import corpus as corpus_mod
    from featurescribe.harvest.batches import Batch

    c = corpus_mod.open_corpus(corpus)
    seqs = list(corpus_mod.sequences(c, tok, 64, tokens))
    return [Batch(np.arange(i, i + len(chunk)), np.arange(i, i + len(chunk)), [s.token_ids for s in chunk],
                  np.ones(len(chunk), bool)) for i in range(0, len(seqs), bs) for chunk in [seqs[i:i + bs]]]


def corpus_of(tok, tokens: int, folder: str) -> str:
    """CORPUS when it holds `tokens` tokens at ctx 64 (builtin:stdlib: about 2M), else a .jsonl in
    `folder` of its documents repeated as often as needed: a GPU round must be ~10^7 tokens."""
    from featurescribe.harvest import corpus as corpus_mod

    c = corpus_mod.open_corpus(CORPUS)
    have = sum(len(s.token_ids) for s in corpus_mod.sequences(c, tok, 64, tokens))
    if have >= tokens:
        return CORPUS
    docs = [json.dumps({"text": text}) + "\n" for text, _ in c.documents()]
    path = Path(folder) / "repeated.jsonl"
    with open(path, "w") as f:
        for _ in range(-(-tokens // max(have, 1)) + 1):  # one copy more: cuts fall elsewhere
            f.writelines(docs)
    print(f"corpus: {CORPUS} has {have:,} tokens at ctx 64; {path.name} repeats its documents "
          f"{-(-tokens // max(have, 1)) + 1} times for {tokens:,} tokens a round", flush=True)
    return str(path)


def gpu_round_tokens(h, tok, bs: int, device: str, seconds: float) -> int:
    """Tokens a round needs for its bare forward pass to last `seconds`, from a timed probe."""
    probe = make_batches(tok, bs * 64 * 48, bs)
    bare_forward(h, probe[:8], device)  # warm up: kernels, allocator
    n, w, _ = bare_forward(h, probe, device)
    tokens = min(int(n / w * seconds), GPU_MAX_ROUND_TOKENS) // (bs * 64) * (bs * 64) + bs * 64
    print(f"speed size: the probe's forward pass ran {n / w:,.0f} tokens/s ({n:,} tokens in {w:.2f} s): "
          f"{tokens:,} tokens a round for about {seconds:.0f} s", flush=True)
    return tokens


def timed(device: str, fn):
    """(wall s, process CPU s, fn's value)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def one_batch_harvest(db: str, bs: int, args, loaded) -> float:
    """Seconds of a harvest of one batch: a process's first harvest pays one-time costs (pyarrow
    imports pandas on first use, DuckDB's first opening), reported apart from the rounds."""
    from featurescribe.harvest.harvester import harvest

    device, model, tok = loaded
    return timed(device, lambda: harvest(cfg_for(db, bs * 64, bs, args.dtype, device), loaded=(MODEL, model, tok)))[0]


def speed(args, loaded) -> dict:
    """Rounds of (bare forward, whole harvest) on the same sequences, interleaved so that both see
    the same machine (in turns: forward first, then harvest first); ratios of the summed times."""
    from featurescribe.harvest.harvester import Harvester, harvest
    from featurescribe.harvest.writer import WRITER_THREADS

    device, model, tok = loaded
    bs = args.batch_size or (128 if device.startswith("cuda") else 32)
    h = Harvester(model, tok, model_id=MODEL, layer=LAYER, site=SITE)
    fwd, hv, entries, per_round = [0, 0.0, 0.0], [0, 0.0, 0.0], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = args.tokens or gpu_round_tokens(h, tok, bs, device, args.gpu_seconds)
        corpus = corpus_of(tok, tokens, tmp)
        batches = make_batches(tok, tokens, bs, corpus)
        bare_forward(h, batches[:2], device)  # warm up
        first, again = (one_batch_harvest(str(Path(tmp) / f"warm{i}.duckdb"), bs, args, loaded) for i in range(2))
        for r_i in range(args.rounds):
            cfg = cfg_for(str(Path(tmp) / f"b{r_i}.duckdb"), tokens, bs, args.dtype, device, corpus=corpus)
            if args.writer_threads:
                cfg = dataclasses.replace(cfg, writer_threads=args.writer_threads)
            if r_i % 2:  # forward, harvest, harvest, forward, ...: a machine that drifts favours neither
                w2, cpu2, r = timed(device, lambda: harvest(cfg, loaded=(MODEL, model, tok)))
            n, w, cpu = bare_forward(h, batches, device)
            fwd = [fwd[0] + n, fwd[1] + w, fwd[2] + cpu]
            if not r_i % 2:
                w2, cpu2, r = timed(device, lambda: harvest(cfg, loaded=(MODEL, model, tok)))  # db open to final stats
            hv = [hv[0] + r.new_tokens, hv[1] + w2, hv[2] + cpu2]
            entries = r.n_activations
            per_round.append((w, w2, (r.new_tokens / w2) / (n / w)))
            Path(cfg.db).unlink()  # a GPU round's file holds several GB
    return {"per_round": per_round, "first_harvest_s": first, "second_harvest_s": again, "device": device,
            "dtype": str(model.dtype).replace("torch.", ""), "batch_size": bs, "tokens": hv[0] // args.rounds,
            "rounds": args.rounds, "entries": entries, "writer_threads": args.writer_threads or WRITER_THREADS,
            "forward_tokens_per_s": fwd[0] / fwd[1], "harvest_tokens_per_s": hv[0] / hv[1],
            "ratio": (hv[0] / hv[1]) / (fwd[0] / fwd[1]), "cpu_ratio": (hv[0] / hv[2]) / (fwd[0] / fwd[2])}


def multisite(args, loaded) -> dict:
    """All MLP layers in one harvest against a bare forward pass to the deepest, and against one
    harvest per layer (as before many-source harvests)."""
    from featurescribe.harvest.harvester import Harvester, HarvestConfig, harvest_all
    from featurescribe.harvest.sites import n_layers

    device, model, tok = loaded
    bs = args.batch_size or (128 if device.startswith("cuda") else 32)
    last = n_layers(model) - 1
    deepest = Harvester(model, tok, model_id=MODEL, layer=last, site=SITE)
    batches = make_batches(tok, args.multi_tokens, bs)
    bare_forward(deepest, batches[:1], device)

    def cfg(db, layer):
        return HarvestConfig(db=db, model=MODEL, layer=layer, site=SITE, corpus=CORPUS, max_tokens=args.multi_tokens,
                             ctx=64, batch_size=bs, device=device, dtype=args.dtype, progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        n, fwd_s, fwd_cpu = bare_forward(deepest, batches, device)
        multi_s, multi_cpu, rs = timed(device, lambda: harvest_all(cfg(str(Path(tmp) / "m.duckdb"), "all"),
                                                                   loaded=(MODEL, model, tok)))
        one_s = one_cpu = 0.0
        if not args.skip_one_by_one:
            for layer in range(last + 1):
                w, cpu, _ = timed(device, lambda: harvest_all(cfg(str(Path(tmp) / "o.duckdb"), layer),
                                                              loaded=(MODEL, model, tok)))
                one_s, one_cpu = one_s + w, one_cpu + cpu
    return {"sources": len(rs), "tokens": n, "entries": sum(r.n_activations for r in rs), "forward_s": fwd_s,
            "multi_s": multi_s, "one_by_one_s": one_s, "ratio": fwd_s / multi_s, "last": last,
            "cpu_ratio": fwd_cpu / multi_cpu, "one_by_one_cpu_ratio": one_cpu / multi_cpu if one_cpu else 0.0}


def memory_child(args) -> dict:
    """One process, one harvest of args.tokens tokens: the peak memory above the loaded model."""
    import torch

    from featurescribe.harvest.harvester import Harvester, harvest
    from featurescribe.native_memory import return_freed_memory

    device, model, tok = load(args.device, args.dtype)
    bs = args.batch_size or (128 if device.startswith("cuda") else 32)
    cuda = device.startswith("cuda")
    # one forward pass of a full batch first, so the allocator's warm-up is not counted as harvest memory
    h = Harvester(model, tok, model_id=MODEL, layer=MEM_LAYER, site=SITE)
    h.reader.run(torch.zeros((bs, 64), dtype=torch.long, device=device))
    del h
    # every weight page in memory: a float32 checkpoint is memory-mapped from its file, so the pages
    # of the embedding rows (113 MiB for smollm2-135m) would come in as the corpus shows new tokens
    with torch.inference_mode():
        for p in model.parameters():
            p.sum()
    import duckdb  # noqa: F401 - imported before the baseline too: module memory is not harvest memory
    import pyarrow  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu0 = torch.cuda.memory_allocated()
        gc.collect()
        return_freed_memory()  # what the loading freed is not a baseline the harvest may reuse
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
    cmd = ["--memory-child", "--tokens", str(tokens), "--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    return json_of_child(cmd, f"memory child for {tokens} tokens")


def json_of_child(argv: list[str], what: str) -> dict:
    """This script in a fresh process: the JSON of its last output line."""
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{what} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (about 5 minutes on 2 CPU cores)")
    ap.add_argument("--gpu", action="store_true", help="the GPU run: --device cuda --dtype bfloat16, no shards")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens per round of the speed test (default on a GPU: what a 12-s forward pass reads, 30 s without --quick)")
    ap.add_argument("--multi-tokens", type=int, default=None, help="tokens of the 30-layer test")
    ap.add_argument("--skip-one-by-one", action="store_true", help="no one-harvest-per-layer comparison")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of forward and harvest")
    ap.add_argument("--writer-threads", type=int, default=None, help="the speed test's writer threads (default: the harvest's)")
    ap.add_argument("--mem-tokens", type=int, default=None, help="N for the memory test (N and 4N tokens)")
    ap.add_argument("--mem-repeats", type=int, default=None, help="processes per size in the memory test, median (default 3; 1 with --gpu)")
    ap.add_argument("--only", default=None, help="comma list of ingest,speed,multisite,shards,memory")
    ap.add_argument("--model", default=None, help="model to harvest (default smollm2-135m)")
    ap.add_argument("--write-model-config", metavar="DIR", default=None,
                    help="write smollm2-135m's config and tokenizer (no weights) to DIR and exit; "
                         "--model DIR then runs a random-weight model of the same architecture")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu:
        args.device, args.dtype = "cuda", args.dtype or "bfloat16"
    return args


def sizes(args, gpu: bool) -> None:
    # a round's forward pass must last about 10 s or more (on a GPU it runs ~10^6 tokens/s; on 2 CPU
    # cores smollm2-135m runs ~2,800 tokens/s to layer 6 and ~700 to layer 29), or the fixed costs
    # (database open, the first batch's threshold, final statistics) are most of what is measured
    q = args.quick
    if args.tokens is None and not gpu:  # on a GPU: sized by a timed probe (gpu_round_tokens)
        args.tokens = 32_768 if q else 65_536
    args.gpu_seconds = 12.0 if q else 30.0
    if args.multi_tokens is None:
        args.multi_tokens = (1_000_000 if q else 4_000_000) if gpu else (8_192 if q else 16_384)
    if args.mem_tokens is None:
        args.mem_tokens = (250_000 if q else 1_000_000) if gpu else (40_000 if q else 100_000)
    if args.mem_repeats is None:
        args.mem_repeats = 1 if gpu else 3
    args.ingest_items = 40 if q else 160
    args.shard_tokens = 8_192 if q else 32_768


def report_ingest(args) -> None:
    from harvest_store import ingest

    g = ingest(args.ingest_items)
    print(f"store ingest: {g['entries']:,} entries; one commit per batch {g['per_batch'] / 1e6:.1f}M/s; "
          f"bare Arrow insert without source_id {g['bare'] / 1e6:.1f}M/s")
    print(f"store ingest, a fresh process's first 4 batches (untimed warm-up): {g['cold_first'] / 1e6:.1f}M/s")
    print("store ingest by writer threads (the harvest's default is 2): "
          + ", ".join(f"{k} {v / 1e6:.1f}M/s" for k, v in g["by_threads"].items()))
    print(f"store ingest per CPU-second (all threads): writers {g['new_cpu'] / 1e6:.1f}M, one commit per batch "
          f"{g['per_batch_cpu'] / 1e6:.1f}M, bare insert {g['bare_cpu'] / 1e6:.1f}M")
    print(f"store_ingest_entries_per_s: {g['new']:.0f}", flush=True)


def report_multisite(args, loaded) -> None:
    m = multisite(args, loaded)
    print(f"multisite: {m['sources']} sources (layers 0-{m['last']} mlp), {m['tokens']:,} tokens, "
          f"{m['entries']:,} entries; forward to layer {m['last']} {m['forward_s']:.1f} s, one pass "
          f"{m['multi_s']:.1f} s, one by one {m['one_by_one_s']:.1f} s")
    if m["one_by_one_s"]:
        print(f"multisite_speedup_vs_one_by_one: {m['one_by_one_s'] / m['multi_s']:.2f}  "
              f"(in CPU time: {m['one_by_one_cpu_ratio']:.2f})")
    print(f"multisite_vs_deepest_forward_cpu_time: {m['cpu_ratio']:.3f}")
    print(f"multisite_vs_deepest_forward: {m['ratio']:.3f}", flush=True)


def shards_child(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harvest_store import shard_speed

    return shard_speed(args.shard_tokens, MODEL, CORPUS)


def report_shards(args) -> None:
    # in a child process: the Prefect server and Dask cluster it starts end with it, and do not
    # share the cores with the parts measured after it
    s = json_of_child(["--shards-child"] + (["--quick"] if args.quick else []), "shards")
    print(f"shards: {args.shard_tokens:,} tokens on {s['cores']} cores: 1 worker {s['wall_1']:.1f} s, "
          f"3 workers {s['wall_3']:.1f} s (streaming only: x{s['stream_speedup']:.2f})")
    print(f"shard_speedup: {s['speedup']:.3f}", flush=True)


def report_memory(args) -> None:
    """Peak memory of a harvest of N and of 4N tokens, each the median of `--mem-repeats` fresh
    processes (run in turns): one process's peak RSS varies by +-15 MiB, the margin of the goal."""
    import statistics

    n, mib = args.mem_tokens, 1 << 20
    runs = [(run_child(n, args), run_child(4 * n, args)) for _ in range(args.mem_repeats)]
    small, large = ([r[i] for r in runs] for i in (0, 1))

    def median(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    def peaks(rs: list[dict], key: str) -> str:
        return "/".join(f"{r[key] / mib:.0f}" for r in rs)

    print(f"memory (layer {MEM_LAYER}, threshold 5%; peak RSS above the loaded model "
          f"{small[0]['rss_before'] / mib:.0f} MiB, {args.mem_repeats} processes each): {small[0]['tokens']:,} tokens, "
          f"{small[0]['entries']:,} entries -> +{peaks(small, 'rss_extra')} MiB (median {median(small, 'rss_extra') / mib:.0f}); "
          f"{large[0]['tokens']:,} tokens, {large[0]['entries']:,} entries -> +{peaks(large, 'rss_extra')} MiB "
          f"(median {median(large, 'rss_extra') / mib:.0f})")
    if "gpu_extra" in small[0]:
        print(f"gpu memory: +{peaks(small, 'gpu_extra')} MiB -> +{peaks(large, 'gpu_extra')} MiB")
        print(f"harvest_gpu_memory_growth: {median(large, 'gpu_extra') / max(median(small, 'gpu_extra'), 1):.3f}")
    print(f"harvest_memory_growth: {median(large, 'rss_extra') / max(median(small, 'rss_extra'), 1):.3f}", flush=True)


def report_speed(s: dict) -> None:
    print(f"device: {s['device']} {s['dtype']}, batch {s['batch_size']} x 64 tokens, {s['rounds']} rounds of "
          f"{s['tokens']:,} tokens, {s['entries']:,} entries kept per harvest, {s['writer_threads']} writer threads")
    print(f"forward_tokens_per_s: {s['forward_tokens_per_s']:.0f}")
    print(f"harvest_tokens_per_s: {s['harvest_tokens_per_s']:.0f}  (the whole harvest: database open to final stats)")
    print(f"warm-up: a process's first harvest (one batch) {s['first_harvest_s']:.2f} s, the same again "
          f"{s['second_harvest_s']:.2f} s")
    print(f"first_harvest_extra_s: {s['first_harvest_s'] - s['second_harvest_s']:.3f}  (once per process, not in the rounds)")
    for i, (fwd_s, hv_s, ratio) in enumerate(s["per_round"]):
        print(f"round {i + 1}: forward {fwd_s:.2f} s, harvest {hv_s:.2f} s, ratio {ratio:.3f}")
    print(f"harvest_vs_forward_cpu_time: {s['cpu_ratio']:.3f}  (tokens per CPU-second, all threads)")
    print(f"harvest_vs_forward: {s['ratio']:.3f}", flush=True)


def main() -> int:
    args = parse_args()
    if args.model:
        global MODEL
        MODEL = os.environ["FEATURESCRIBE_BENCH_MODEL"] = args.model
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    if args.shards_child:
        sizes(args, gpu=False)
        print(json.dumps(shards_child(args)))
        return 0
    if args.write_model_config:
        write_model_config(args.write_model_config)
        return 0
    from featurescribe.harvest.models import pick_device

    gpu = pick_device(args.device).startswith("cuda")
    sizes(args, gpu)
    only = set(args.only.split(",")) if args.only else {"ingest", "speed", "multisite", "shards", "memory"}
    if gpu:
        only.discard("shards")  # one shard per GPU: a one-GPU machine has nothing to split
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "ingest" in only:
        report_ingest(args)
    loaded = load(args.device, args.dtype) if only & {"speed", "multisite"} else None
    if "multisite" in only:
        report_multisite(args, loaded)
    if "shards" in only:
        report_shards(args)
    if "memory" in only:
        report_memory(args)
    if "speed" in only:
        report_speed(speed(args, loaded))  # last: its ratio is the headline
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
