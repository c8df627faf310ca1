"""Labelling at scale: features per minute against the ideal, memory as the run grows, and a
SIGTERM in the middle followed by a resume that pays for nothing twice.

A synthetic source is generated straight into the store (no harvest): `n` features, each active
at `--rows` random positions of random sequences. `featurescribe label` runs in a child process
(the Prefect label flow, ephemeral server) with the explainer `openai:gpt-4o-mini` through the real
openai SDK against the fake provider of the tests in another child process (every answer after
`--latency` s), the `lexical` simulator, and few windows per feature (the judge's work is not
what is measured here: the pipeline around it is).

- `label_scale_efficiency`: features per minute over the span of the run's LLM calls (from the
  first to the last ledger row: Prefect's start is left out), divided by the ideal
  `concurrency / latency / calls per feature` (calls per feature read from the ledger). With `--no-embed` the labels are
  not embedded as each chunk is written (FEATURESCRIBE_EMBED=0): the local MiniLM's CPU time is
  then not in the label process.
- `label_memory_growth`: the label process's peak RSS at the large size / at the small size.
- `label_resume_repeated_calls`: SIGTERM once about half the features are done, run the same
  command again: paid calls of the second run whose prompt the first run had already paid for.

    python benchmarks/label_scale.py --quick   # 2,000 and 8,000 features
    python benchmarks/label_scale.py           # 10,000 and 100,000 features

Last line: `label_scale_efficiency: E`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.llm_throughput import ServerProcess  # noqa: E402
from benchmarks.sampling import build_sequences  # noqa: E402

SOURCE = "0-scale"
WINDOWS = "explain.top=4,explain.quantile=0,valid.top=0,valid.random=0,test.top=1,test.random=1"
CTX = 64


def build(db: str, n_features: int, rows_per_feature: int, n_seqs: int) -> None:
    """The synthetic source: every feature active at `rows_per_feature` random places, and its
    `features` rows as a harvest writes them (statistics, status 'alive')."""
    from featurescribe.store import open_db
    from featurescribe.store.activation_store import insert_activations_query

    con = open_db(db)
    try:
        build_sequences(con, SOURCE, n_features, n_seqs, CTX, vocab=5000)
        insert_activations_query(con, SOURCE, f"""
            SELECT DISTINCT ON (f, s, p) f::INTEGER, s, p, a FROM (
                SELECT f, (hash(f, i, 1) % {n_seqs})::BIGINT AS s, (hash(f, i, 2) % {CTX})::INTEGER AS p,
                       ((hash(f, i, 3) % 100000) / 1e4)::REAL + 0.01 AS a
                FROM range({n_features}) t(f), range({rows_per_feature}) u(i))""")
        con.execute(f"""
            INSERT INTO features (source_id, feature_id, n_active, frac_active, max_act, mean_act, status)
            SELECT '{SOURCE}', feature_id, count(*), count(*) / {n_seqs * CTX}, max(act), avg(act), 'alive'
            FROM activations GROUP BY feature_id""")
    finally:
        con.close()


@dataclass
class LabelProcess:
    """One `featurescribe label` child: its exit status, peak RSS and progress."""

    rc: int | None = None
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0  # user + system CPU of the label process
    done: int = 0
    seconds: float = 0.0


def run_label(db: str, base_url: str, concurrency: int, stop_at: int | None = None) -> LabelProcess:
    """The label command; with `stop_at`, SIGTERM once its progress passes that many features."""
    import psutil

    cmd = [sys.executable, "-m", "featurescribe", "label", "--db", db, "--source", SOURCE,
           "--features", "all", "--explainer", "openai:gpt-4o-mini", "--simulator", "lexical",
           "--windows", WINDOWS, "--concurrency", str(concurrency)]
    env = dict(os.environ, OPENAI_BASE_URL=f"{base_url}/v1", OPENAI_API_KEY="bench", PYTHONPATH=str(ROOT),
               FEATURESCRIBE_PREFECT_LIMITS="off", PREFECT_LOGGING_LEVEL="WARNING")
    out = LabelProcess()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    reader = threading.Thread(target=_follow_progress, args=(proc, out, stop_at), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            out.peak_rss_mb = max(out.peak_rss_mb, ps.memory_info().rss / 2**20)
            times = ps.cpu_times()
            out.cpu_s = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.2)
    reader.join(timeout=5)
    out.rc, out.seconds = proc.returncode, time.perf_counter() - t0
    return out


def _follow_progress(proc, out: LabelProcess, stop_at: int | None) -> None:
    for line in proc.stderr:
        m = re.match(r"label: ([\d,]+)/", line)
        if m:
            out.done = int(m.group(1).replace(",", ""))
            if stop_at is not None and out.done >= stop_at and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                stop_at = None


def ledger_figures(db: str) -> dict:
    """Calls, the span of the first run's calls, labelled features, repeated paid calls."""
    from featurescribe.store import open_db

    con = open_db(db, read_only=True)
    try:
        runs = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY started_at").fetchall()]
        paid = "status IN ('ok', 'parse_error')"
        span = con.execute(f"""SELECT count(*), epoch(max(created_at) - min(created_at)), avg(latency_s)
                               FROM llm_calls WHERE run_id = ? AND {paid}""", [runs[0]]).fetchone()
        labelled = con.execute("SELECT count(*) FROM labels WHERE source_id = ?", [SOURCE]).fetchone()[0]
        repeated = con.execute(f"""SELECT count(*) FROM llm_calls b WHERE b.run_id <> ? AND b.{paid}
                                   AND b.prompt_hash IN (SELECT prompt_hash FROM llm_calls
                                                         WHERE run_id = ? AND {paid})""",
                               [runs[0], runs[0]]).fetchone()[0]
        first_labelled = con.execute("SELECT count(*) FROM explanations WHERE run_id = ? AND chosen",
                                     [runs[0]]).fetchone()[0]
        statuses = [r[0] for r in con.execute("SELECT status FROM runs ORDER BY started_at").fetchall()]
    finally:
        con.close()
    return {"calls": span[0], "span_s": float(span[1] or 0.0), "latency_s": float(span[2] or 0.0),
            "labelled": labelled, "repeated": repeated,
            "first_labelled": first_labelled, "statuses": statuses}


def measure(n: int, args, base_url: str, tmp: str, kill: bool = False) -> tuple[LabelProcess, dict, list]:
    db = os.path.join(tmp, f"scale-{n}{'-kill' if kill else ''}.duckdb")
    t = time.perf_counter()
    build(db, n, args.rows, args.seqs)
    print(f"{n:,} features generated in {time.perf_counter() - t:.1f} s", flush=True)
    first = run_label(db, base_url, args.concurrency, stop_at=n // 2 if kill else None)
    runs = [first]
    if kill:
        runs.append(run_label(db, base_url, args.concurrency))
    return first, ledger_figures(db), runs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="small,large (default 10000,100000; --quick 2000,8000)")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rows", type=int, default=40, help="activation rows per feature")
    ap.add_argument("--seqs", type=int, default=4000)
    ap.add_argument("--no-embed", action="store_true", help="FEATURESCRIBE_EMBED=0 for the label runs")
    args = ap.parse_args()
    if args.no_embed:
        os.environ["FEATURESCRIBE_EMBED"] = "0"
    small, large = (int(x) for x in (args.sizes or ("2000,8000" if args.quick else "10000,100000")).split(","))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(args.latency) as base_url:
        rates, peaks = {}, {}
        for n in (small, large):
            proc, fig, _ = measure(n, args, base_url, tmp)
            per_feature = fig["calls"] / max(1, fig["labelled"])
            ideal = args.concurrency / args.latency / per_feature * 60.0
            rates[n] = (fig["labelled"] / fig["span_s"] * 60.0 if fig["span_s"] else 0.0) / ideal
            peaks[n] = proc.peak_rss_mb
            print(f"{n:,} features: rc {proc.rc}, {fig['labelled']:,} labelled, {fig['calls']:,} paid calls "
                  f"({per_feature:.2f}/feature) over {fig['span_s']:.1f} s of calls, {proc.seconds:.1f} s "
                  f"in all, {proc.cpu_s:.1f} s CPU; mean call {fig['latency_s']:.3f} s (so at most "
                  f"{args.latency / max(fig['latency_s'], 1e-9):.2f} of the ideal); ideal {ideal:,.0f}/min; "
                  f"efficiency {rates[n]:.3f}; "
                  f"peak RSS {proc.peak_rss_mb:,.0f} MB",
                  flush=True)
        first, fig, runs = measure(small, args, base_url, tmp, kill=True)
        print(f"kill and resume at {small:,} features: first run rc {first.rc} with {fig['first_labelled']:,} "
              f"labelled, then rc {runs[1].rc}; runs {fig['statuses']}; {fig['labelled']:,} labelled in all",
              flush=True)
    figures = {"label_resume_repeated_calls": str(fig["repeated"]),
               "label_memory_growth": f"{peaks[large] / peaks[small]:.3f}",
               "label_scale_efficiency": f"{rates[large]:.3f}"}  # the headline last
    print(f"concurrency {args.concurrency}, latency {args.latency:g} s, windows {WINDOWS}, "
          f"labels embedded: {'no' if args.no_embed else 'yes'}")
    for name, value in figures.items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
