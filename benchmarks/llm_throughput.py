"""LLM client throughput: does the client layer keep C requests in flight?

Against the fake provider of the tests (tests/fake_llm.py, a real HTTP server on 127.0.0.1)
answering every request after a fixed latency L, a client with concurrency C can at best do
C / L requests a second. We send N distinct requests through the full client as `featurescribe
label` runs it (the cache look-up, the openai SDK, the retry loop, the limiter, the ledger and
cache writes in DuckDB) and report achieved rate / (C / L):

    llm_concurrency_efficiency: R        (goal >= 0.8)

The server runs in a child process (`python -m tests.fake_llm`) so that its threads do not share
the client's GIL (a real provider is another machine); it costs about 0.6 ms of CPU a request,
against some 3 ms for the client. `--quick` sends 1,920 requests, the full run 6,400, through
each HTTP stack the client offers under the openai SDK (`--http`): the SDK's default httpx and,
when the aiohttp package is installed, the SDK's aiohttp transport (`FEATURESCRIBE_LLM_HTTP=aiohttp`).

Why the figure falls short of 1 on few cores: one event loop serves all C requests, and a request
needs about five loop iterations between its answer arriving and the next request going out (the
socket read, the task's wakeup, httpcore's checkpoints, the concurrency slot handed to the next
waiter). Each iteration runs every ready callback, so at 300 requests/s an iteration lasts ~10-15 ms
and the cycle of a slot is L + ~5 iterations. That is proportional to the CPU time per request
(~3 ms through the openai SDK on httpx on a 2-core machine, ~2.2 ms on aiohttp; the SDK and the
HTTP stack are ~90 % of it, this project's code ~6 %). Per-request CPU time (client and server)
is printed beside the rates: it is robust to other processes sharing the machine, the rates are
not. Headline: the default stack (httpx); the aiohttp line is the same measurement on aiohttp.

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


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure_concurrency(latency_s: float = 0.2, concurrency: int = 64, n_requests: int = 1024,
                        with_store: bool = True, http: str = "httpx") -> dict:
    """Requests/s of a client with `concurrency` against a server with `latency_s`, and the CPU
    seconds per request of the client process and of the server process."""
    from featurescribe.llm import CallStore, make_client
    from featurescribe.store import open_db

    import openai  # noqa: F401  (imported now, not inside the CPU times)

    if http == "aiohttp":
        import aiohttp  # noqa: F401
        from openai import DefaultAioHttpClient  # noqa: F401
    server = ServerProcess(latency_s)
    with server as url:
        pid = server._p.pid
        os.environ["OPENAI_BASE_URL"] = url + "/v1"
        os.environ.setdefault("OPENAI_API_KEY", "bench-key")
        with tempfile.TemporaryDirectory() as tmp:
            con = open_db(os.path.join(tmp, "bench.duckdb")) if with_store else None
            store = CallStore(con) if con is not None else None
            client = make_client("openai:gpt-4o-mini", store=store, run_id="bench",
                                 concurrency=concurrency, use_cache=True, timeout_s=30, http=http)
            cpu0, server0 = time.process_time(), _cpu_seconds(pid)

            async def main():
                try:
                    return await _run_requests(client, n_requests)
                finally:
                    await client.aclose()

            took = asyncio.run(main())
            if store is not None:
                store.flush()  # the ledger's writes are part of the client's cost
            client_cpu, server1 = time.process_time() - cpu0, _cpu_seconds(pid)
            n_rows = None
            if store is not None:
                store.flush()
                n_rows = con.execute("SELECT count(*) FROM llm_calls WHERE run_id = 'bench'").fetchone()[0]
                store.close()
                con.close()
    rate = n_requests / took
    ideal = concurrency / latency_s
    n_all = n_requests + min(n_requests, concurrency)  # the warm-up requests are in the CPU times
    server_cpu = None if server0 is None or server1 is None else (server1 - server0)
    return {"requests": n_requests, "seconds": took, "rate": rate, "ideal": ideal,
            "efficiency": rate / ideal, "ledger_rows": n_rows, "server_requests": server.n_requests,
            "server_max_in_flight": server.max_in_flight, "http": http,
            "client_cpu_ms_per_request": client_cpu / n_all * 1000,
            "server_cpu_ms_per_request": None if server_cpu is None else server_cpu / n_all * 1000}


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
    ap.add_argument("--http", default=None, help="HTTP stacks to measure, e.g. httpx,aiohttp "
                    "(default: httpx, and aiohttp when it is installed)")
    args = ap.parse_args()
    # enough requests for the first synchronised waves of C requests to spread out
    n = args.requests or (1920 if args.quick else 6400)
    stacks = args.http.split(",") if args.http else ["httpx"] + (["aiohttp"] if _has_aiohttp() else [])
    results = {}
    for http in stacks:
        r = results[http] = measure_concurrency(args.latency, args.concurrency, n, http=http)
        server_ms = r["server_cpu_ms_per_request"]
        print(f"[{http}] latency {args.latency:g} s, concurrency {args.concurrency}, {r['requests']} requests "
              f"in {r['seconds']:.2f} s; ledger rows {r['ledger_rows']}, server saw {r['server_requests']} "
              f"(at most {r['server_max_in_flight']} at once); CPU per request: client "
              f"{r['client_cpu_ms_per_request']:.2f} ms, server "
              + (f"{server_ms:.2f} ms" if server_ms is not None else "?"), flush=True)
    for http, r in results.items():
        print(f"llm_requests_per_s_{http}: {r['rate']:.1f}")
        print(f"llm_client_cpu_ms_per_request_{http}: {r['client_cpu_ms_per_request']:.2f}")
    for http, r in results.items():
        if http != stacks[0]:
            print(f"llm_concurrency_efficiency_{http}: {r['efficiency']:.3f}")
    first = results[stacks[0]]
    print(f"llm_ideal_requests_per_s: {first['ideal']:.1f}")
    print(f"llm_concurrency_efficiency: {first['efficiency']:.3f}")
    return 0


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
