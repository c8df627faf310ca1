"""LLM client throughput: does the client layer keep C requests in flight?

Against the fake provider of the tests (tests/fake_llm.py, a real HTTP server on 127.0.0.1)
answering every request after a fixed latency L, a client with concurrency C can at best do
C / L requests a second. We send N requests through the full client (the openai SDK, the
retry loop, the limiter, the ledger in DuckDB) and report achieved rate / (C / L):

    llm_concurrency_efficiency: R        (goal >= 0.8)

The server runs in a child process (`python -m tests.fake_llm`) so that its threads do not share
the client's GIL (a real provider is another machine). `--quick` sends 1,920 requests, the full
run 6,400. The client is CPU-bound near 1 / (CPU time per request): about 2.5 ms through the
openai SDK on a 16-core machine, so C = 64 at L = 0.2 s (320/s) is close to what one event loop
can do; on a loaded machine the figure drops with the CPU it gets.

`measure_concurrency(...)` is reusable; `label_rate_per_minute(...)` is the helper the flow
benchmark (benchmarks/flow_overhead.py) builds on: features labelled per minute by a callable,
with and without the Prefect flow around it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class ServerProcess:
    """The fake provider in a child process: `with ServerProcess(0.2) as base_url: ...`.

    `base_url` is `http://127.0.0.1:PORT` (OpenAI clients add `/v1`). After the block,
    `max_in_flight` and `n_requests` say what the server saw.
    """

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self._p: subprocess.Popen | None = None
        self.max_in_flight: int | None = None
        self.n_requests: int | None = None

    def __enter__(self) -> str:
        self._p = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_llm", "--latency", str(self.latency_s)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self._p.stdout.readline()
        if not line.startswith("PORT "):
            self._p.kill()
            raise RuntimeError(f"fake LLM server did not start: {line!r}")
        return f"http://127.0.0.1:{int(line.split()[1])}"

    def __exit__(self, *exc) -> None:
        assert self._p is not None
        try:
            out, _ = self._p.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self._p.kill()
            out, _ = self._p.communicate()
        for line in out.splitlines():
            if line.startswith("MAX_IN_FLIGHT "):
                self.max_in_flight = int(line.split()[1])
            elif line.startswith("REQUESTS "):
                self.n_requests = int(line.split()[1])


async def _run_requests(client, n: int) -> float:
    from featurescribe.llm import ChatRequest

    async def one(i: int):
        req = ChatRequest(
            messages=({"role": "user", "content": f"request {i}: say ok"},), max_tokens=16, purpose="bench"
        )
        return await client.chat(req)

    # warm the connection pool, then time the rest
    await asyncio.gather(*(one(-i - 1) for i in range(min(n, client.settings.concurrency))))
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


def measure_concurrency(latency_s: float = 0.2, concurrency: int = 64, n_requests: int = 1024,
                        with_store: bool = True) -> dict:
    """Requests/s of a client with `concurrency` against a server with `latency_s`."""
    from featurescribe.llm import CallStore, make_client
    from featurescribe.store import open_db

    server = ServerProcess(latency_s)
    with server as url:
        os.environ["OPENAI_BASE_URL"] = url + "/v1"
        os.environ.setdefault("OPENAI_API_KEY", "bench-key")
        with tempfile.TemporaryDirectory() as tmp:
            con = open_db(os.path.join(tmp, "bench.duckdb")) if with_store else None
            store = CallStore(con) if con is not None else None
            client = make_client("openai:gpt-4o-mini", store=store, run_id="bench",
                                 concurrency=concurrency, use_cache=False, timeout_s=30)

            async def main():
                try:
                    return await _run_requests(client, n_requests)
                finally:
                    await client.aclose()

            took = asyncio.run(main())
            n_rows = None
            if store is not None:
                store.flush()
                n_rows = con.execute("SELECT count(*) FROM llm_calls WHERE run_id = 'bench'").fetchone()[0]
                store.close()
                con.close()
    rate = n_requests / took
    ideal = concurrency / latency_s
    return {"requests": n_requests, "seconds": took, "rate": rate, "ideal": ideal,
            "efficiency": rate / ideal, "ledger_rows": n_rows, "server_requests": server.n_requests,
            "server_max_in_flight": server.max_in_flight}


def label_rate_per_minute(label_features: Callable[[], Awaitable[int] | int]) -> tuple[int, float]:
    """Run `label_features()` (returns how many features it labelled; sync or async) and return
    (features, features per minute). The flow benchmark calls it once through the Prefect flow
    and once on the bare labeler, against the same ServerProcess, and reports the ratio."""
    t0 = time.perf_counter()
    out = label_features()
    if asyncio.iscoroutine(out):
        out = asyncio.run(out)
    took = time.perf_counter() - t0
    n = int(out)
    return n, (n / took * 60.0 if took > 0 else float("inf"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=None)
    args = ap.parse_args()
    # enough requests for the first synchronised waves of C requests to spread out
    n = args.requests or (1920 if args.quick else 6400)
    r = measure_concurrency(args.latency, args.concurrency, n)
    print(f"latency {args.latency:g} s, concurrency {args.concurrency}, {r['requests']} requests "
          f"in {r['seconds']:.2f} s; ledger rows {r['ledger_rows']}, server saw {r['server_requests']} "
          f"(at most {r['server_max_in_flight']} at once)")
    print(f"llm_requests_per_s: {r['rate']:.1f}")
    print(f"llm_ideal_requests_per_s: {r['ideal']:.1f}")
    print(f"llm_concurrency_efficiency: {r['efficiency']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
