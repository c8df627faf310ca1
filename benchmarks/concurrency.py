"""Reading a database while a label run writes it, and two writers on one file.

Against the fake provider of the tests (tests/fake_llm.py in a child process, a fixed latency per
answer), `featurescribe label` (the Prefect flow, a child process) labels a synthetic source with
the `openai:gpt-4o-mini` explainer and the `lexical` simulator:

- without a reader, and with a reader that runs `featurescribe sql --db DB "SELECT count(*) FROM
  explanations"` once a second (each a new process, as a user at a shell would), in the order
  without, with, with, without (so that drift of a loaded machine falls on both alike). The rate
  is features per minute between the run's `started_at` and `finished_at` (its `runs` row: the
  process and Prefect start are left out). `reader_success_rate` is the fraction of the reader's
  commands that answered (exit 0) within 5 s, the command's start included.
- the harvest's writers (benchmarks/harvest_store.py's synthetic SAE-shaped items, 1M-entry
  commits) with the database held open throughout (as before) and opened per commit (as now), in
  the order held, per commit, per commit, held: `harvest_ingest_open_per_commit_ratio`.
- a label run and a harvest of SmolLM2 (layer 2, offline) into the same file at once; then the same
  harvest alone into a copy. `concurrent_writers_ok` is 1 when both finished, every feature got its
  one chosen label, and the harvest wrote exactly the activations (and no more sequences) that it
  writes alone.

    python benchmarks/concurrency.py --quick     # 120 features per run, one without/with/with/without
    python benchmarks/concurrency.py             # 240 features per run, twice that order

Prints the figures, then (last line, the headline) `reader_success_rate: R`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.llm_throughput import ServerProcess  # noqa: E402

ANSWER_WITHIN_S = 5.0


def featurescribe(*args: str) -> list[str]:
    return [sys.executable, "-m", "featurescribe", *args]


def label_args(db: str, source: str, n: int, chunk: int, concurrency: int) -> list[str]:
    return featurescribe("label", "--db", db, "--source", source, "--features", f"2:{n + 2}",
                         "--explainer", "openai:gpt-4o-mini", "--simulator", "lexical",
                         "--chunk-size", str(chunk), "--concurrency", str(concurrency), "--no-progress")


def harvest_args(db: str, corpus: str, tokens: int) -> list[str]:
    return featurescribe("harvest", "--db", db, "--model", "smollm2-135m", "--layer", "2", "--corpus", corpus,
                         "--ctx", "64", "--max-tokens", str(tokens), "--no-progress")


def finished(proc: subprocess.Popen, what: str) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {err.strip()[-800:]}")
    return out


def query(db: str, sql: str):
    from featurescribe.store import open_db

    con = open_db(db, read_only=True, create=False)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


class Reader:
    """`featurescribe sql` once a second while `proc` runs; (seconds, exit status) of each.
    `db=":memory:"`: the same commands on no file (the control: their CPU without their lock)."""

    def __init__(self, db: str):
        self.db = db
        self.answers: list[tuple[float, int, str]] = []

    def follow(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            t0 = time.monotonic()
            r = subprocess.run(featurescribe("sql", "--db", self.db, "SELECT count(*) FROM explanations",
                                             "--format", "csv"), capture_output=True, text=True)
            took = time.monotonic() - t0
            self.answers.append((took, r.returncode, (r.stderr.strip().splitlines() or [""])[-1]))
            time.sleep(max(0.0, 1.0 - took))


def label_once(db: str, args: argparse.Namespace, reader: Reader | None) -> float:
    """One label run (a child process); returns its features per minute (its runs row's span)."""
    from tests.test_sampling import SOURCE

    proc = subprocess.Popen(label_args(db, SOURCE, args.n, args.chunk, args.concurrency),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follower = threading.Thread(target=reader.follow, args=(proc,)) if reader else None
    if follower:
        follower.start()
    finished(proc, "label")
    if follower:
        follower.join()
    ((n, secs),) = query(db, "SELECT (SELECT count(*) FROM explanations WHERE chosen), "
                             "epoch(finished_at - started_at) FROM runs WHERE flow = 'label'")
    if n != args.n:
        raise SystemExit(f"the label run labelled {n} features, not {args.n}")
    return n / secs * 60.0


def throughput(base: str, tmp: str, args: argparse.Namespace) -> tuple[float, float, list]:
    reader_answers: list = []
    rates: dict[str, list[float]] = {"without": [], "with": [], "control": []}
    order = ["without", "with", "with", "without"] * args.rounds
    if args.control:
        order[2:2] = ["control", "control"]
    for i, kind in enumerate(order):
        db = os.path.join(tmp, f"run{i}.duckdb")
        shutil.copy(base, db)
        reader = Reader(db if kind == "with" else ":memory:") if kind != "without" else None
        rate = label_once(db, args, reader)
        rates[kind].append(rate)
        print(f"label run {i + 1}/{len(order)} ({kind} reader): {rate:.1f} features/min"
              + (f", {len(reader.answers)} reads" if reader else ""), flush=True)
        if kind == "with":
            reader_answers += reader.answers
        os.remove(db)
    if rates["control"]:
        print(f"label with the control reader (same commands, no file): "
              f"{statistics.mean(rates['control']) / statistics.mean(rates['without']):.3f} of the rate without")
    return statistics.mean(rates["with"]), statistics.mean(rates["without"]), reader_answers


def _ingest_seconds(items: list, path: str, per_commit: bool) -> float:
    from featurescribe.harvest.batches import SeqIds
    from featurescribe.harvest.writer import RowMaker, Writers
    from featurescribe.store import open_db
    from featurescribe.store.harvest_rows import harvest_source_keys
    from featurescribe.store.connection import Database

    if os.path.exists(path):
        os.remove(path)
    con = open_db(path)
    con.execute("SET memory_limit = '128MB'")
    keys = harvest_source_keys(con, ["6-res-sae16k"])
    if per_commit:
        con.close()
    target = Database(path, memory_headroom_mb=128) if per_commit else con
    t0 = time.perf_counter()
    w = Writers(target, RowMaker(["6-res-sae16k"], keys, "tok", "corpus", None, SeqIds(0)))
    for it in items:
        w.put(it)
    w.close()
    if not per_commit:
        con.close()  # its last checkpoint, which the commits opened one by one have made already
    return time.perf_counter() - t0


def harvest_ingest(tmp: str, n_items: int) -> float:
    """Entries per second opened per commit / held open (see the module docstring)."""
    from benchmarks.harvest_store import synthetic_items

    items = synthetic_items(n_items)
    n = sum(it.n_entries for it in items)
    secs: dict[bool, list[float]] = {False: [], True: []}
    for per_commit in (False, True, True, False):
        secs[per_commit].append(_ingest_seconds(items, os.path.join(tmp, "ingest.duckdb"), per_commit))
    held, opened = n / statistics.mean(secs[False]), n / statistics.mean(secs[True])
    print(f"harvest writers, {n:,} entries: held open {held / 1e6:.2f}M/s, opened per commit "
          f"{opened / 1e6:.2f}M/s", flush=True)
    return opened / held


def two_writers(base: str, tmp: str, args: argparse.Namespace) -> int:
    from tests.test_harvest import TEXT
    from tests.test_sampling import SOURCE

    corpus = os.path.join(tmp, "corpus.txt")
    Path(corpus).write_text(TEXT * 40)
    both, alone = os.path.join(tmp, "both.duckdb"), os.path.join(tmp, "alone.duckdb")
    shutil.copy(base, both)
    shutil.copy(base, alone)
    t0 = time.monotonic()
    procs = {"label": subprocess.Popen(label_args(both, SOURCE, args.n, args.chunk, args.concurrency),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             "harvest": subprocess.Popen(harvest_args(both, corpus, args.tokens), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)}
    for what, p in procs.items():
        finished(p, what)
    print(f"label + harvest into one file: both finished in {time.monotonic() - t0:.1f} s", flush=True)
    finished(subprocess.Popen(harvest_args(alone, corpus, args.tokens), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True), "harvest alone")
    acts = "SELECT source_id, feature_id, seq_id, pos, act FROM activations WHERE source_id <> '%s' ORDER BY ALL" % SOURCE
    same_acts = query(both, acts) == query(alone, acts)
    seqs = "SELECT count(*), count(DISTINCT seq_id) FROM sequences"
    labelled = query(both, "SELECT count(*), count(DISTINCT feature_id) FROM explanations WHERE chosen")
    ok = same_acts and query(both, seqs) == query(alone, seqs) and labelled == [(args.n, args.n)]
    print(f"  activations as harvested alone: {same_acts}; labels {labelled[0][0]}/{args.n}", flush=True)
    return int(ok)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--latency", type=float, default=0.5, help="the fake provider's seconds per answer")
    ap.add_argument("--control", action="store_true",
                    help="also label beside a reader that runs the same commands on no file (its CPU alone)")
    ap.add_argument("--no-writers", action="store_true", help="leave out the label + harvest part")
    args = ap.parse_args()
    args.n = 120 if args.quick else 240
    args.rounds = 1 if args.quick else 2
    args.chunk, args.concurrency, args.tokens = 10, 4, (2048 if args.quick else 8192)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["FEATURESCRIBE_PREFECT_LIMITS"] = "off"
    os.environ["FEATURESCRIBE_EMBED"] = "0"  # the labels' embeddings are another benchmark's
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)

    from featurescribe.store import open_db
    from tests.test_sampling import build_db

    with ServerProcess(args.latency) as url, tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_BASE_URL"] = url + "/v1"
        os.environ["OPENAI_API_KEY"] = "bench-key"
        base = os.path.join(tmp, "base.duckdb")
        con = open_db(base)
        build_db(con, n_features=args.n + 2, n_seqs=200)  # 0 dead, 1 rare, then the n to label
        con.close()
        with_r, without_r, answers = throughput(base, tmp, args)
        ingest_ratio = harvest_ingest(tmp, 40 if args.quick else 160)
        writers_ok = None if args.no_writers else two_writers(base, tmp, args)
    times = sorted(a[0] for a in answers)
    good = sum(1 for took, rc, _ in answers if rc == 0 and took <= ANSWER_WITHIN_S)
    failures = sorted({err for _, rc, err in answers if rc != 0})
    print(f"reader: {len(answers)} commands, median {statistics.median(times):.2f} s, "
          f"max {times[-1]:.2f} s" + (f"; failures: {failures}" if failures else ""))
    print(f"label: {without_r:.1f} features/min without the reader, {with_r:.1f} with it")
    print(f"harvest_ingest_open_per_commit_ratio: {ingest_ratio:.3f}")
    print(f"label_throughput_with_readers: {with_r / without_r:.3f}")
    if writers_ok is not None:
        print(f"concurrent_writers_ok: {writers_ok}")
    print(f"reader_success_rate: {good / len(answers):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
