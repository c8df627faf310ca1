"""What the Prefect label flow costs over the bare label loop.

The same labelling work twice, on two copies of one synthetic source (so neither run is answered
from the other's cache): the explainer `openai:gpt-4o-mini` against the fake provider of the tests
in a child process (every answer after a fixed latency), the `lexical` simulator. Once through
`label_run.run_label` (the plain loop: prepare, compute, write per chunk), once through the
Prefect label flow (tasks per chunk, the runs row, Prefect's records; ephemeral server, started
before the clock runs). Headline: features per minute through the flow / the bare loop,

    flow_overhead_ratio: R        (1.0 = no overhead)

plus the one-time start of Prefect's ephemeral server, and the same flow on a 2-worker local
Dask cluster (its start included: that is what a run pays).

    python benchmarks/flow_overhead.py --quick    # 120 features, chunks of 30, no Dask run
    python benchmarks/flow_overhead.py            # 600 features, chunks of 100, and Dask

--quick leaves out the Dask run (its cluster start, some 40 s on 2 CPU cores, is nearly all of
it; `--dask` puts it back).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.llm_throughput import ServerProcess, label_rate_per_minute  # noqa: E402


class Rates(NamedTuple):
    n_bare: int
    bare: float  # features per minute
    n_flow: int
    flowed: float
    startup: float  # seconds
    dask: float | None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--features", type=int, default=None)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--dask", action="store_true", help="run the Dask flow at --quick size too")
    args = ap.parse_args()
    if args.quick and not args.dask:
        args.no_dask = True
    args.features = args.features or (120 if args.quick else 600)
    args.chunk_size = args.chunk_size or (30 if args.quick else 100)
    return args


def make_dbs(tmp: str, n: int) -> dict[str, str]:
    """One synthetic source copied for each run, so that no run is answered from another's cache."""
    from featurescribe.store import open_db
    from tests.test_sampling import build_db

    base = os.path.join(tmp, "base.duckdb")
    con = open_db(base)
    build_db(con, n_features=n + 2, n_seqs=200)  # features 0 (dead) and 1 (rare) + n to label
    con.close()
    dbs = {k: os.path.join(tmp, f"{k}.duckdb") for k in ("bare", "flow", "dask")}
    for p in dbs.values():
        shutil.copy(base, p)
    return dbs


def start_prefect() -> float:
    """Seconds to import the label flow and start Prefect's ephemeral server."""
    t0 = time.perf_counter()
    import featurescribe.flows.label_flow  # noqa: F401 - its import is part of what a flow run pays
    from prefect import flow

    @flow
    def warm_up() -> int:
        return 0

    warm_up()  # starts the ephemeral server
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> Rates:
    from featurescribe.flows.label_options import LabelOptions
    from featurescribe.flows.label_run import run_label
    from tests.test_sampling import SOURCE

    n = args.features
    with ServerProcess(args.latency) as url, tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_BASE_URL"] = url + "/v1"
        os.environ["OPENAI_API_KEY"] = "bench-key"
        dbs = make_dbs(tmp, n)
        opts = dict(features=f"2:{n + 2}", explainer="openai:gpt-4o-mini", simulator="lexical",
                    concurrency=32, chunk_size=args.chunk_size)

        params = LabelOptions(source=SOURCE, **opts)
        n_bare, bare = label_rate_per_minute(lambda: len(run_label(dbs["bare"], params, progress=False).labelled))
        startup = start_prefect()
        from featurescribe.flows.label_flow import label_flow

        n_flow, flowed = label_rate_per_minute(lambda: len(label_flow(
            db=dbs["flow"], source=SOURCE, no_progress=True, **opts).labelled))
        dask_rate = None
        if not args.no_dask:
            _, dask_rate = label_rate_per_minute(lambda: len(label_flow(
                db=dbs["dask"], source=SOURCE, no_progress=True, task_runner="dask", workers=2,
                **opts).labelled))
    return Rates(n_bare, bare, n_flow, flowed, startup, dask_rate)


def main() -> int:
    args = parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["FEATURESCRIBE_PREFECT_LIMITS"] = "off"  # ephemeral mode anyway: in-process limits
    r = measure(args)
    print(f"{args.features} features, chunks of {args.chunk_size}, provider latency {args.latency:g} s, concurrency 32")
    print(f"bare loop: {r.n_bare} labelled, {r.bare:,.0f} features/min")
    print(f"label flow (threads): {r.n_flow} labelled, {r.flowed:,.0f} features/min")
    if r.dask is not None:
        print(f"label flow (dask, 2 local workers, cluster start included): {r.dask:,.0f} features/min")
    print(f"prefect_ephemeral_startup_s: {r.startup:.1f}")
    print(f"flow_overhead_ratio: {r.flowed / r.bare:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
