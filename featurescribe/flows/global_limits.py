"""Provider limits across processes: Prefect global concurrency and rate limits.

With no Prefect server configured (ephemeral mode) each process keeps the LLM layer's own
limits (`llm/limits.py`: a concurrency cap per client, RPM/TPM buckets per backend:model), and a
Dask run shares `--concurrency` out between its workers.

When `PREFECT_API_URL` names a server, provider backends (`openai:`, `anthropic:`) also take the
server's global limits, so a provider's limit holds for every process that labels at once (this
flow, its Dask workers, other runs and deployments on other machines):

- `featurescribe-llm-<backend>` (e.g. `featurescribe-llm-openai`), a concurrency limit: a chunk
  task holds as many slots as requests it may have in flight (its client's concurrency) while it
  runs. Created with `--concurrency` slots when missing; an existing limit is respected, never
  changed (`prefect gcl update featurescribe-llm-openai --limit 64`).
- `featurescribe-llm-<backend>-rpm`, a rate limit (slots that decay): one slot per request. Created
  when an RPM is configured (`FEATURESCRIBE_LLM_RPM`); used whenever it exists.

Slots are held under a 60 s lease that the holder renews. A process killed outright (SIGKILL)
cannot give its slots back: they return when the lease expires, which the server's repossessor
service does on `prefect server start` within about a minute. Meanwhile a resumed run waits for
them (or free them at once: `prefect gcl update featurescribe-llm-openai --active-slots 0`).
`FEATURESCRIBE_PREFECT_LIMITS=off` keeps the in-process limits only, even with a server.
A server that stops answering during a run costs the run nothing but the global limits: a chunk
(or request) that cannot reach it goes on under the in-process limits, which always apply too.
Local models (`local:`) are not a shared provider and take no global slot.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from featurescribe.llm.base import ChatRequest, ChatResponse, parse_backend_spec
from featurescribe.llm.registry import BACKENDS

LEASE_S = 60  # the shortest lease Prefect allows
log = logging.getLogger(__name__)
# set once the server stopped answering: later chunks of this process do not wait on it again
_SERVER_AWAY = threading.Event()


@dataclass(frozen=True)
class GlobalLimits:
    """A backend's Prefect limits (picklable: goes to Dask workers)."""

    concurrency_name: str
    limit: int  # slots of the concurrency limit
    rate_name: str | None = None


def limit_names(backend: str) -> tuple[str, str]:
    base = f"featurescribe-llm-{backend}"
    return base, f"{base}-rpm"


def enabled() -> bool:
    return os.environ.get("FEATURESCRIBE_PREFECT_LIMITS", "on").strip().lower() not in ("off", "0", "false", "no")


def ensure_global_limits(specs: list[str], concurrency: int, rpm: float | None = None) -> dict[str, GlobalLimits]:
    """The server's limits for the provider backends among `specs`, created when missing.

    Returns {backend: GlobalLimits} (local and baseline backends are left out).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if rpm is None and os.environ.get("FEATURESCRIBE_LLM_RPM"):
        rpm = float(os.environ["FEATURESCRIBE_LLM_RPM"])
    out: dict[str, GlobalLimits] = {}
    with get_client(sync_client=True) as client:
        def read(name: str):
            try:
                return client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                return None

        for spec in specs:
            backend, _ = parse_backend_spec(spec)
            if backend not in BACKENDS.where(shared_limits=True) or backend in out:
                continue
            conc_name, rate_name = limit_names(backend)
            conc = read(conc_name)
            if conc is None:
                client.upsert_global_concurrency_limit_by_name(conc_name, max(1, int(concurrency)))
                conc = read(conc_name)
            rate = read(rate_name)
            if rate is None and rpm:
                per_s = float(rpm) / 60.0  # `limit` slots, each freed after 1 / per_s seconds
                client.upsert_global_concurrency_limit_by_name(
                    rate_name, max(1, int(round(per_s))), slot_decay_per_second=per_s)
                rate = read(rate_name)
            out[backend] = GlobalLimits(conc_name, int(conc.limit), rate_name if rate is not None else None)
    _SERVER_AWAY.clear()  # it answered: this run takes its limits again
    return out


@asynccontextmanager
async def chunk_slots(clients: list[Any], limits: dict[str, GlobalLimits] | None) -> AsyncIterator[None]:
    """Hold, for a chunk, the concurrency slots its clients may use, and make every request of
    theirs take a rate-limit slot. A no-op without limits."""
    from contextlib import AsyncExitStack

    if not limits or _SERVER_AWAY.is_set():
        yield
        return
    from prefect.concurrency.asyncio import concurrency

    async with AsyncExitStack() as stack:
        for backend, lim in limits.items():
            mine = [c for c in clients if c is not None and getattr(c, "backend", None) == backend]
            if not mine:
                continue
            occupy = min(max(c.settings.concurrency for c in mine), max(1, lim.limit))
            try:
                await stack.enter_async_context(concurrency(
                    lim.concurrency_name, occupy=occupy, strict=True, lease_duration=LEASE_S))
            except Exception as err:
                if not _server_gone(err):
                    raise
                continue
            if lim.rate_name:
                for c in mine:
                    _rate_limited(c, lim.rate_name)
        yield


class _RateLimitedBackend:
    """A backend whose every request (each attempt) first takes a Prefect rate-limit slot."""

    def __init__(self, inner: Any, rate_name: str):
        self._inner = inner
        self._rate_name = rate_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float,
                   retry_index: int = 0) -> ChatResponse:
        from prefect.concurrency.asyncio import rate_limit

        try:
            if not _SERVER_AWAY.is_set():
                await rate_limit(self._rate_name, strict=True)
        except Exception as err:
            if not _server_gone(err):
                raise
        return await self._inner.send(request, max_tokens=max_tokens, timeout=timeout,
                                      retry_index=retry_index)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _rate_limited(client: Any, rate_name: str) -> None:
    backend = getattr(client, "_backend", None)
    if backend is not None and not isinstance(backend, _RateLimitedBackend):
        client._backend = _RateLimitedBackend(backend, rate_name)


def _server_gone(err: BaseException) -> bool:
    """The Prefect server stopped answering (its limits with it): the work goes on under the
    in-process limits, and the command says at its end that the server went away."""
    from featurescribe.flows.prefect_env import prefect_server_gone

    if prefect_server_gone(err) is None:
        return False
    if not _SERVER_AWAY.is_set():
        _SERVER_AWAY.set()
        # said on the console once, at the command's end (PrefectServerGone)
        log.debug("the Prefect server's global limits cannot be reached; going on under this process's own limits")
    return True
