"""Task runners for the label flow: threads in the flow's process, or a Dask cluster.

`--task-runner thread` (default) runs chunks on a few threads of the flow's own process.
`--task-runner dask` spreads them over a Dask cluster: a LocalCluster of `--workers` processes
started for the run, or an existing cluster at `--dask-address` (tcp://scheduler:8786). Workers
only compute (LLM calls); what they return travels back to the flow, the one writer of the
database.

A Dask worker reports its task runs to Prefect, so it must reach the same Prefect API as the flow:
with a configured server that is `PREFECT_API_URL`; in ephemeral mode the flow's temporary server
is started first and its URL handed to the local workers (`workers_see_api`). Workers of an
existing cluster on other machines need `PREFECT_API_URL` set to a server they can reach.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from featurescribe.errors import FeaturescribeError

RUNNERS = ("thread", "dask")


def make_task_runner(kind: str, *, threads: int = 2, workers: int = 2, address: str | None = None):
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(1, threads))
    if kind == "dask":
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": max(1, workers), "threads_per_worker": 1, "processes": True,
                            "dashboard_address": ":0", "silence_logs": logging.WARNING},
        )
    raise FeaturescribeError(f"unknown task runner {kind!r}: use {' or '.join(RUNNERS)}")


def check_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a `--dask-address` where no scheduler listens, or whose workers cannot run our tasks,
    before any work: Dask itself first connects at the first task, and gives up 30 s later with a
    traceback."""
    import socket

    from distributed.comm import get_address_host_port

    try:
        host, port = get_address_host_port(address)
    except ValueError as err:
        raise FeaturescribeError(f"bad --dask-address {address!r}: {err}; use tcp://HOST:PORT") from None
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise FeaturescribeError(f"cannot reach the Dask scheduler at {address} "
                                 f"({err.strerror or err}); start it, or leave out --dask-address") from None
    _check_workers(address, timeout_s)


def _check_workers(address: str, timeout_s: float) -> None:
    """Refuse a cluster with a worker that cannot import featurescribe (started from another
    environment): it would die unpickling the first chunk and the run wait for it, without a word.
    A cluster with no workers yet is said on stderr, not refused: an adaptive one (dask-jobqueue,
    dask-kubernetes) starts its workers once the tasks arrive."""
    from distributed import Client

    from featurescribe.errors import first_error_line

    try:
        workers = asyncio.run(_scheduler_identity(address, timeout_s))["workers"]
    except (OSError, TimeoutError) as err:  # something listens there, but no Dask scheduler answers
        reason = first_error_line(err) if str(err) else f"no answer in {timeout_s:g} s"
        raise FeaturescribeError(f"no Dask scheduler answers at {address} ({reason}); "
                                 "start one, or leave out --dask-address") from None
    if not workers:
        print(f"the Dask scheduler at {address} has no workers yet: the work waits for them (start some "
              f"with: dask worker {address})", file=sys.stderr, flush=True)
        return
    with Client(address, timeout=timeout_s, set_as_default=False) as client:
        # exec, a builtin, travels by name: a worker without featurescribe can still run it
        outcomes = client.run(exec, "import featurescribe", on_error="return")
    failed = {worker: err for worker, err in outcomes.items() if isinstance(err, BaseException)}
    if failed:
        worker, err = sorted(failed.items())[0]
        raise FeaturescribeError(f"{len(failed)} of the {len(outcomes)} Dask workers at {address} cannot import "
                                 f"featurescribe (worker {worker}: {first_error_line(err)}); start them in an "
                                 "environment that has it, or leave out --dask-address")


async def _scheduler_identity(address: str, timeout_s: float) -> dict:
    """The scheduler's answer to `identity` (its workers among it), within `timeout_s`: Dask's own
    timeouts do not cover a peer that accepts the connection and never answers."""
    from distributed.core import rpc

    async def ask() -> dict:
        async with rpc(address, timeout=timeout_s) as scheduler:
            return await scheduler.identity()

    return await asyncio.wait_for(ask(), timeout_s)


@contextmanager
def workers_see_api() -> Iterator[str]:
    """Make processes started from here (Dask workers) use this process's Prefect API.

    Sets `PREFECT_API_URL` in the environment for the duration: the configured server's URL, or
    the URL of the ephemeral server, started now if it is not running yet.
    """
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the process-wide ephemeral server (a singleton)
        server.start()
        url = server.api_url
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = str(url)
    try:
        yield str(url)
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def add_runner_arguments(p) -> None:
    """`--task-runner`, `--workers`, `--dask-address` (label, serve)."""
    p.add_argument("--task-runner", choices=RUNNERS, default="thread",
                   help="thread (default): chunks run in this process; dask: chunks spread over a Dask "
                        "cluster (the database is still written by this process only)")
    p.add_argument("--workers", type=int, default=2,
                   help="dask: worker processes of the local cluster (default: 2)")
    p.add_argument("--dask-address", default=None, metavar="ADDRESS",
                   help="dask: use the running cluster at this scheduler address (tcp://host:8786) "
                        "instead of starting a local one")
