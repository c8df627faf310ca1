"""The price table: USD per 1M input and output tokens, per `backend:model`.

The defaults live in `prices.json` next to this file (list prices, with the date they were
checked). `FEATURESCRIBE_PRICES=path.json` names a file of the same shape whose entries are
merged over the defaults; its `models` may also be given at the top level:

    {"models": {"openai:my-finetune": {"input": 0.3, "output": 1.2}}}

An entry may add `cached_input` (input tokens read from the provider's prompt cache) and
`cache_write` (written to it, Anthropic); without them those tokens cost the input price.

A model name matches its exact key, else the longest key it starts with, so dated snapshots
(`gpt-4o-2024-08-06`, `claude-sonnet-4-5-20250929`) take their family's price. A bare model name
(no `backend:`) in a user file applies to every backend. Unknown models cost 0, with a note.
Local models (`local:`) always cost 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from featurescribe.errors import FeaturescribeError
from featurescribe.llm.registry import BACKENDS

DEFAULT_PRICES = Path(__file__).with_name("prices.json")
ENV_VAR = "FEATURESCRIBE_PRICES"


@dataclass(frozen=True)
class Price:
    input: float  # USD per 1M input tokens
    output: float  # USD per 1M output tokens
    cached_input: float | None = None  # per 1M input tokens read from the prompt cache (None: input)
    cache_write: float | None = None  # per 1M input tokens written to the prompt cache (None: input)

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0, written_tokens: int = 0) -> float:
        """`input_tokens` counts all input; of it, `cached_tokens` and `written_tokens` are priced
        at the cache's prices."""
        read = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        plain = max(0, input_tokens - cached_tokens - written_tokens)
        return (plain * self.input + cached_tokens * read + written_tokens * write
                + output_tokens * self.output) / 1_000_000


def _read(path: Path) -> dict[str, Price]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FeaturescribeError(f"price file {path} does not exist ({ENV_VAR})") from None
    except (OSError, ValueError) as err:
        raise FeaturescribeError(f"cannot read price file {path}: {err}") from None
    models = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise FeaturescribeError(f"price file {path}: expected an object of model -> prices")
    out: dict[str, Price] = {}
    for key, val in models.items():
        if key.startswith("_") or key in ("checked", "sources"):
            continue
        try:
            out[key.lower()] = Price(float(val["input"]), float(val["output"]),
                                     *(None if val.get(k) is None else float(val[k])
                                       for k in ("cached_input", "cache_write")))
        except (TypeError, KeyError, ValueError):
            raise FeaturescribeError(
                f"price file {path}: {key!r} needs numbers 'input' and 'output' (USD per 1M tokens)"
            ) from None
    return out


class PriceTable:
    """Look up prices; see the module docstring."""

    def __init__(self, prices: dict[str, Price]):
        self.prices = dict(prices)

    @classmethod
    def load(cls, override: str | os.PathLike | None = None) -> "PriceTable":
        """The shipped table, with `override` (else $FEATURESCRIBE_PRICES) merged over it."""
        prices = _read(DEFAULT_PRICES)
        path = override if override is not None else os.environ.get(ENV_VAR)
        if path:
            prices.update(_read(Path(path).expanduser()))
        return cls(prices)

    def lookup(self, backend: str, model: str) -> Price | None:
        backend, model = backend.lower(), model.lower()
        if backend in BACKENDS.where(runs_locally=True):
            return Price(0.0, 0.0)
        for name in (f"{backend}:{model}", model):
            if name in self.prices:
                return self.prices[name]
        best, best_len = None, -1
        for key, price in self.prices.items():
            kb, sep, km = key.partition(":")
            if not sep:
                kb, km = backend, key
            if kb == backend and model.startswith(km) and len(km) > best_len:
                rest = model[len(km):]
                # a snapshot suffix (-2024-08-06, -20250929, -latest), not another model (gpt-4o-mini)
                if rest == "" or rest[0] in "-@." and _looks_like_snapshot(rest[1:]):
                    best, best_len = price, len(km)
        return best

    def cost(self, backend: str, model: str, input_tokens: int, output_tokens: int,
             cached_tokens: int = 0, written_tokens: int = 0) -> tuple[float, str | None]:
        """(cost in USD, a note when the model has no price)."""
        price = self.lookup(backend, model)
        if price is None:
            return 0.0, f"no price for {backend}:{model}; cost recorded as 0 (set {ENV_VAR})"
        return price.cost(input_tokens, output_tokens, cached_tokens, written_tokens), None


def _looks_like_snapshot(rest: str) -> bool:
    r = rest.replace("-", "")
    return r.isdigit() or rest in ("latest", "preview") or rest.startswith("v")
