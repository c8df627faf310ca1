"""Parquet (every table as it is) and JSON (one feature dictionary) exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from featurescribe.export.common import dumps
from featurescribe.store.export_queries import (
    FeatureBundle,
    copy_table_to_parquet,
    iter_feature_bundles,
    table_names,
)

DICTIONARY_FORMAT = "featurescribe.feature_dictionary"
DICTIONARY_VERSION = 1


def write_parquet(con, sources: list[dict], out: Path, *, source_id: str | None = None,
                  on_table: Callable[[], None] | None = None) -> dict:
    """DIR/{table}.parquet for every table and view, rows in a fixed order."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, _kind in table_names(con):
        counts[name] = copy_table_to_parquet(con, name, str(out / f"{name}.parquet"), source_id)
        if on_table:
            on_table()
    return {"tables": counts}


def lift_of(s: dict) -> float | None:
    """Score minus its own shuffled baseline, else minus the population baseline (--baseline
    sample:N), as the `labels` view computes it."""
    base = s["baseline_shuffled"] if s["baseline_shuffled"] is not None else s.get("baseline_population")
    if s["value"] is None or base is None:
        return None
    return s["value"] - base


def _score(s: dict) -> dict[str, Any]:
    return {
        "scorer": s["scorer"], "value": s["value"], "simulator": s["simulator"], "split": s["split"],
        "n_examples": s["n_examples"], "baseline_shuffled": s["baseline_shuffled"],
        "baseline_tokens": s["baseline_tokens"], "baseline_population": s.get("baseline_population"),
        "lift": lift_of(s), "details": s["details"],
    }


def label_score(e: dict) -> dict | None:
    """The score the `labels` view reads beside an explanation: simulation, test split, highest."""
    if not e["scores"]:
        return None
    return sorted(
        e["scores"],
        key=lambda s: (s["scorer"] != "simulation", (s["split"] or "test") != "test", -(s["value"] or 0.0)),
    )[0]


def best_explanation(b: FeatureBundle) -> dict | None:
    e = b.best_explanation()
    if e is None:
        return None
    s = label_score(e)
    return {
        "explanation_id": e["explanation_id"], "text": e["text"], "explainer": e["explainer"],
        "method": e["method"],
        "score": s["value"] if s else None, "scorer": s["scorer"] if s else None,
        "simulator": s["simulator"] if s else None, "split": s["split"] if s else None,
        "baseline_shuffled": s["baseline_shuffled"] if s else None,
        "baseline_tokens": s["baseline_tokens"] if s else None,
        "baseline_population": s.get("baseline_population") if s else None, "lift": lift_of(s) if s else None,
    }


def _window(w: dict) -> dict:
    return {"seq_id": w["seq_id"], "start_pos": w["start_pos"], "split": w["split"],
            "quantile": w["quantile"], "tokens": w["tokens"], "acts": w["acts"]}


def feature_entry(b: FeatureBundle) -> dict[str, Any]:
    return {
        "source_id": b.source_id,
        "feature_id": b.feature_id,
        "stats": b.stats,
        "best_explanation": best_explanation(b),
        "explanations": [
            {"explanation_id": e["explanation_id"], "text": e["text"], "explainer": e["explainer"],
             "method": e["method"], "candidate": e["candidate"], "chosen": e["chosen"], "status": e["status"],
             "created_at": e["created_at"], "scores": [_score(s) for s in e["scores"]]}
            for e in b.explanations
        ],
        "top_examples": [_window(w) for w in b.windows("top")],
        "quantile_examples": [_window(w) for w in b.windows("quantile")],
        "random_examples": [_window(w) for w in b.windows("random")],
        "histogram": b.histogram,
    }


def write_json(con, sources: list[dict], out: Path, *, on_feature: Callable[[], None] | None = None) -> dict:
    """DIR/feature_dictionary.json, written feature by feature; the whole file is one JSON object."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "feature_dictionary.json", "w", encoding="utf-8", newline="\n") as f:
        f.write("{")
        f.write(f'"format": {dumps(DICTIONARY_FORMAT)}, "version": {DICTIONARY_VERSION},\n')
        f.write(f'"sources": {dumps(sources)},\n')
        f.write('"features": [')
        for src in sources:
            for b in iter_feature_bundles(con, src["source_id"], histogram=True):
                f.write(("\n" if n == 0 else ",\n") + dumps(feature_entry(b)))
                n += 1
                if on_feature:
                    on_feature()
        f.write("\n]}\n")
    return {"features": n}
