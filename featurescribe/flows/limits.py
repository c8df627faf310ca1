"""Provider limits across processes: Prefect global concurrency and rate limits.

With no Prefect server configured (ephemeral mode) each process keeps the LLM layer's own
limits (`llm/limits.py`: a concurrency cap per client, RPM/TPM buckets per backend:model).
When `PREFECT_API_URL` names a server, every process that labels (the flow, Dask workers, other
deployments' runs on other machines) also takes a slot of the server's global limits around each
request, so a provider's limit holds for all of them together:

- `featurescribe-llm-<backend>` (e.g. `featurescribe-llm-openai`): requests in flight at once,
  `--concurrency`;
- `featurescribe-llm-<backend>-rpm`: a rate limit (slot decay) when an RPM is configured
  (`FEATURESCRIBE_LLM_RPM`).

The limits are created, or updated to the values of the run, when a label flow starts; see or
change them with `prefect gcl ls` / `prefect gcl update`. Local models (`local:`) are not a
shared provider and take no global slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featurescribe.llm.base import ChatRequest, ChatResponse, parse_backend_spec

SHARED_BACKENDS = ("openai", "anthropic")


@dataclass(frozen=True)
class GlobalLimits:
    """The names of the Prefect limits a backend's requests take (picklable: goes to workers)."""

    concurrency_name: str
    rate_name: str | None = None


def limit_names(spec: str) -> tuple[str, str]:
    backend, _ = parse_backend_spec(spec)
    base = f"featurescribe-llm-{backend}"
    return base, f"{base}-rpm"


def ensure_global_limits(specs: list[str], concurrency: int, rpm: float | None = None) -> dict[str, GlobalLimits]:
    """Create or update the server's global limits for the provider backends among `specs`.

    Returns {backend: GlobalLimits} for those backends (local and baseline ones are left out).
    """
    from prefect.client.orchestration import get_client

    out: dict[str, GlobalLimits] = {}
    with get_client(sync_client=True) as client:
        for spec in dict.fromkeys(specs):
            backend, _ = parse_backend_spec(spec)
            if backend not in SHARED_BACKENDS or backend in out:
                continue
            conc_name, rate_name = limit_names(spec)
            client.upsert_global_concurrency_limit_by_name(conc_name, max(1, int(concurrency)))
            rate = None
            if rpm:
                # a rate limit: `limit` slots, each freed after 1 / decay seconds
                per_s = float(rpm) / 60.0
                client.upsert_global_concurrency_limit_by_name(
                    rate_name, max(1, int(round(per_s))), slot_decay_per_second=per_s)
                rate = rate_name
            out[backend] = GlobalLimits(conc_name, rate)
    return out


class GloballyLimitedBackend:
    """A backend whose every request first takes the Prefect global limits' slots.

    It wraps one attempt (`send`), so retries wait for a slot again and cache hits take none.
    """

    def __init__(self, inner: Any, limits: GlobalLimits):
        self._inner = inner
        self._limits = limits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def send(self, request: ChatRequest, *, max_tokens: int, timeout: float,
                   retry_index: int = 0) -> ChatResponse:
        from prefect.concurrency.asyncio import concurrency, rate_limit

        if self._limits.rate_name:
            await rate_limit(self._limits.rate_name, strict=True)
        async with concurrency(self._limits.concurrency_name, occupy=1, strict=True):
            return await self._inner.send(request, max_tokens=max_tokens, timeout=timeout,
                                          retry_index=retry_index)

    async def aclose(self) -> None:
        await self._inner.aclose()


def apply_global_limits(client: Any, limits: dict[str, GlobalLimits] | None) -> Any:
    """Make `client` (an `llm.Client`) take its backend's global limits, if it has any."""
    if not limits or client is None:
        return client
    lim = limits.get(getattr(client, "backend", ""))
    backend = getattr(client, "_backend", None)
    if lim is not None and backend is not None and not isinstance(backend, GloballyLimitedBackend):
        client._backend = GloballyLimitedBackend(backend, lim)
    return client
