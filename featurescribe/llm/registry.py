"""The LLM backends, one entry each: the name a BACKEND spec starts with, how to build the
backend, and what it can do. Every list of backends (CLI help, preflight checks, batch and
Prefect-limit eligibility, prices, exports) is read from here.

Adding a backend: a module under `llm/backends/` with a `Backend` subclass, and one
`BackendKind(...)` line in `BUILTIN_BACKENDS` (or `register_backend(...)` from outside the
package, e.g. a test-only backend).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from featurescribe.llm.backends.base import Backend
from featurescribe.llm.base import NotAnLLMBackend, parse_backend_spec

# the no-LLM kinds a BACKEND spec may also name: labelers and scorers build them themselves
NO_LLM_KINDS = ("baseline", "lexical")
HTTP_STACKS = ("httpx", "aiohttp")


@dataclass(frozen=True)
class BackendOptions:
    """What the client layer hands a backend factory."""

    timeout_s: float = 120.0
    device: str = "auto"
    pool_size: int = 64
    http: str = "httpx"
    structured: str = "auto"  # auto | json_schema | json_object | text (llm/negotiation.py)


@dataclass(frozen=True)
class BackendKind:
    name: str  # 'openai' in 'openai:gpt-4o-mini'
    factory: Callable[[str, BackendOptions], Backend]  # (model, options) -> Backend
    example_model: str  # shown in error messages
    logprobs: bool = False  # may give token logprobs (a simulator then reads expected values)
    structured_output: bool = True  # answers in a given JSON schema
    batch_provider: str | None = None  # "module:Class" of its batch-API adapter (label --batch)
    shared_limits: bool = False  # a remote provider: Prefect global limits shared across processes
    runs_locally: bool = False  # on this machine: free, small-model prompt defaults
    check_model: str | None = None  # "module:function" that raises when the model is not usable


def _lazy(path: str, options: tuple[str, ...] = ()) -> Callable[[str, BackendOptions], Backend]:
    """A factory that imports `module:Class` on first use (the SDKs are heavy to import)."""

    def make(model: str, given: BackendOptions) -> Backend:
        return _import(path)(model, **{k: getattr(given, k) for k in options})

    return make


BUILTIN_BACKENDS: tuple[BackendKind, ...] = (
    BackendKind("openai", _lazy("featurescribe.llm.backends.openai_backend:OpenAIBackend",
                                options=("timeout_s", "pool_size", "http", "structured")),
                "gpt-4o-mini", logprobs=True, shared_limits=True,
                batch_provider="featurescribe.llm.batch.openai_batch:OpenAIBatchProvider"),
    BackendKind("anthropic", _lazy("featurescribe.llm.backends.anthropic_backend:AnthropicBackend",
                                   options=("timeout_s", "pool_size")),
                "claude-haiku-4-5", shared_limits=True,
                batch_provider="featurescribe.llm.batch.anthropic_batch:AnthropicBatchProvider"),
    BackendKind("local", _lazy("featurescribe.llm.backends.local:LocalBackend", options=("device",)),
                "smollm2-135m", logprobs=True, runs_locally=True,
                check_model="featurescribe.harvest.models:resolve_model"),
)


class BackendRegistry:
    """Backend kinds by name. `BACKENDS` is the package's one instance."""

    def __init__(self, kinds: tuple[BackendKind, ...] = ()):
        self._kinds: dict[str, BackendKind] = {k.name: k for k in kinds}

    def register(self, kind: BackendKind) -> None:
        if kind.name in NO_LLM_KINDS:
            raise ValueError(f"{kind.name!r} is reserved for a no-LLM baseline")
        self._kinds[kind.name] = kind

    def unregister(self, name: str) -> None:
        self._kinds.pop(name, None)

    def get(self, name: str) -> BackendKind | None:
        return self._kinds.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def where(self, **capabilities: Any) -> tuple[str, ...]:
        """Names of the kinds whose capabilities have these values (truthy for True)."""
        return tuple(n for n, k in self._kinds.items()
                     if all(bool(getattr(k, c)) == bool(v) for c, v in capabilities.items()))

    def specs_help(self) -> str:
        """'openai:MODEL, anthropic:MODEL, local:MODEL' for help and error texts."""
        return ", ".join(f"{n}:MODEL" for n in self._kinds)


BACKENDS = BackendRegistry(BUILTIN_BACKENDS)


def register_backend(kind: BackendKind) -> None:
    BACKENDS.register(kind)


def kind_of(spec: str) -> BackendKind | None:
    """The LLM backend a spec names; None for a no-LLM spec or an unknown name."""
    return BACKENDS.get(parse_backend_spec(spec)[0])


def is_llm_spec(spec: str) -> bool:
    return kind_of(spec) is not None


def resolve(spec: str) -> tuple[BackendKind, str]:
    """(kind, model) of an LLM BACKEND spec; NotAnLLMBackend for anything else."""
    name, model = parse_backend_spec(spec)
    if name in NO_LLM_KINDS:
        raise NotAnLLMBackend(
            f"{spec!r} is a baseline, not an LLM backend: it needs no client (labelers and scorers "
            f"build it themselves); LLM backends are {BACKENDS.specs_help()}")
    kind = BACKENDS.get(name)
    if kind is None:
        raise NotAnLLMBackend(
            f"unknown backend {spec!r}: use {BACKENDS.specs_help()}, baseline:tokens or lexical")
    if not model:
        raise NotAnLLMBackend(f"backend {spec!r} names no model (e.g. {name}:{kind.example_model})")
    return kind, model


def make_backend(spec: str, options: BackendOptions | None = None) -> Backend:
    """The backend of an LLM BACKEND spec (MissingAPIKey when its key is not set)."""
    options = options or BackendOptions()
    kind, model = resolve(spec)
    if options.http not in HTTP_STACKS:
        raise NotAnLLMBackend(
            f"unknown HTTP stack {options.http!r} (FEATURESCRIBE_LLM_HTTP): use httpx or aiohttp")
    from featurescribe.llm.negotiation import STRUCTURED_CHOICES

    if options.structured not in STRUCTURED_CHOICES:
        raise NotAnLLMBackend(f"unknown structured-output form {options.structured!r}: "
                              f"use {', '.join(STRUCTURED_CHOICES)}")
    return kind.factory(model, options)


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def check_backend(spec: str) -> None:
    """Raise, before any work, the error a run would meet: missing API key, unknown backend, or
    a model that cannot be found. No-LLM specs pass."""
    if parse_backend_spec(spec)[0] in NO_LLM_KINDS:
        return
    make_backend(spec)
    kind, model = resolve(spec)
    if kind.check_model:
        _import(kind.check_model)(model)


def batch_provider_class(name: str):
    """The batch-API adapter class of backend `name` (ValueError when it has none)."""
    kind = BACKENDS.get(name)
    if kind is None or kind.batch_provider is None:
        raise ValueError(f"no batch API for backend {name!r} (batches: "
                         f"{', '.join(BACKENDS.where(batch_provider=True))})")
    return _import(kind.batch_provider)
