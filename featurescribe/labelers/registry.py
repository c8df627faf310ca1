"""The explainers, found by BACKEND spec.

Any LLM backend of `llm/registry.py` explains through `LLMExplainer` (no entry needed here);
the no-LLM explainers are listed in `EXPLAINERS` by the spec they answer to. Adding one: a
module with an `Explainer` subclass and one `ExplainerKind(...)` line in `BUILTIN_EXPLAINERS`
(or `EXPLAINERS.register(...)` from outside the package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from featurescribe.labelers.base import Explainer
from featurescribe.labelers.baseline import TokenListExplainer
from featurescribe.labelers.llm_explainer import METHODS, LLMExplainer
from featurescribe.llm.base import parse_backend_spec
from featurescribe.llm.registry import BACKENDS, NO_LLM_KINDS, kind_of


@dataclass(frozen=True)
class ExplainerKind:
    spec: str  # the whole BACKEND spec it answers to, e.g. 'baseline:tokens'
    make: Callable[..., Explainer]  # (**options) -> Explainer; it needs no LLM client
    method: str  # what `explanations.method` records for it


BUILTIN_EXPLAINERS: tuple[ExplainerKind, ...] = (
    ExplainerKind("baseline:tokens", TokenListExplainer, "tokens"),
)


class ExplainerRegistry:
    def __init__(self, kinds: tuple[ExplainerKind, ...] = ()):
        self._kinds = {k.spec: k for k in kinds}

    def register(self, kind: ExplainerKind) -> None:
        self._kinds[kind.spec] = kind

    def get(self, spec: str) -> ExplainerKind | None:
        return self._kinds.get(spec.strip().lower())

    def specs(self) -> tuple[str, ...]:
        return tuple(self._kinds)


EXPLAINERS = ExplainerRegistry(BUILTIN_EXPLAINERS)

# small local models: the shortest way of showing the windows, a plain-text answer, fewer windows
LOCAL_METHOD, LOCAL_ANSWER, LOCAL_MAX_WINDOWS = "marked", "text", 8


def explainer_specs_help() -> str:
    return ", ".join((*EXPLAINERS.specs(), BACKENDS.specs_help()))


def is_llm_explainer(spec: str) -> bool:
    return EXPLAINERS.get(spec) is None and parse_backend_spec(spec)[0] not in NO_LLM_KINDS


def check_explainer_spec(spec: str) -> None:
    """ValueError for a spec that names no explainer (`lexical` is a simulator only)."""
    kind, model = parse_backend_spec(spec)
    if EXPLAINERS.get(spec) is not None:
        return
    if kind in NO_LLM_KINDS:
        if kind == "lexical":
            raise ValueError(f"'lexical' is a simulator, not an explainer: use {explainer_specs_help()}")
        raise ValueError(f"unknown baseline explainer {spec!r}: use {', '.join(EXPLAINERS.specs())}")
    if kind_of(spec) is None:
        raise ValueError(f"unknown explainer {spec!r}: use {explainer_specs_help()}")
    if not model:
        raise ValueError(f"explainer {spec!r} names no model (e.g. {kind}:MODEL)")


def _runs_locally(spec: str) -> bool:
    kind = kind_of(spec)
    return kind is not None and kind.runs_locally


def default_method(spec: str) -> str:
    """The way of showing windows when none is asked: `marked` for local models, else `pairs`."""
    return LOCAL_METHOD if _runs_locally(spec) else "pairs"


def resolve_method(spec: str, method: str | None) -> str:
    return default_method(spec) if method in (None, "", "auto") else method


def method_name(spec: str, method: str | None) -> str:
    """What `explanations.method` records: the prompt style, or the no-LLM explainer's own."""
    kind = EXPLAINERS.get(spec)
    return kind.method if kind is not None else resolve_method(spec, method)


def make_explainer(spec: str, *, client: Any = None, method: str | None = None,
                   max_windows: int | None = None, answer: str | None = None, **kw) -> Explainer:
    """The explainer for BACKEND `spec`; an LLM spec needs its `client`. Local models answer in
    plain text and see at most LOCAL_MAX_WINDOWS windows unless told otherwise."""
    check_explainer_spec(spec)
    kind = EXPLAINERS.get(spec)
    if kind is not None:
        return kind.make(**kw)
    if client is None:
        raise ValueError(f"explainer {spec} needs an LLM client")
    local = _runs_locally(spec)
    if answer is None:
        answer = LOCAL_ANSWER if local else "json"
    if max_windows is None and local:
        max_windows = LOCAL_MAX_WINDOWS
    return LLMExplainer(client, resolve_method(spec, method), answer=answer, max_windows=max_windows, **kw)


__all__ = ["EXPLAINERS", "ExplainerKind", "METHODS", "check_explainer_spec", "default_method",
           "is_llm_explainer", "make_explainer", "method_name", "resolve_method"]
