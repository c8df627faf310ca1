"""EleutherAI delphi's results layout, one run folder per source.

    DIR/{sourceId}/run_config.json
    DIR/{sourceId}/explanations/{module}_latent{i}.txt
    DIR/{sourceId}/scores/{scorer}/{module}_latent{i}.txt
    DIR/{sourceId}/log/hookpoint_firing_counts.pt

`{module}` is delphi's hookpoint name for the source (`layers.6.mlp`, `layers.6` for the residual
stream, `layers.6.self_attn`). As delphi writes them, an explanation file is the explanation as
a JSON string, and a score file is a JSON list: for `detection` and `fuzz` one record per judged
window (`str_tokens`, `activations`, `distance`, `activating`, `prediction`, `probability`,
`correct`), for `simulation` the scored simulations (`distance` 0 is all windows together,
each with its `scored_sequence_simulations`, correlations that cannot be computed as "nan").

`hookpoint_firing_counts.pt` is what delphi's result analysis reads for its frequency-weighted
F1: a `torch.save`d dict {module: int64 tensor [width]}, each latent's `n_active` (tokens where it
fired above the source's threshold; 0 for a latent no row of `features` has).

Each latent gets its best explanation (the `labels` view; else the chosen candidate) and that
explanation's scores. A detection or fuzzing score whose details hold no per-window records
gets no score file, since delphi's format has no place for a bare number.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable

from featurescribe.export.common import delphi_module, dumps, preferred_score, write_text
from featurescribe.scorers.metrics import correlation
from featurescribe.store.export_queries import FeatureBundle, iter_feature_bundles

SCORER_DIRS = {"simulation": "simulation", "detection": "detection", "fuzzing": "fuzz"}
_RECORD_LISTS = ("examples", "records", "samples", "windows")


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _distance(kind: str | None, quantile: int | None, n_bins: int = 0) -> int:
    """delphi's `distance`: -1 for a random window, else the quantile counted from the strongest
    (its 0). Our top windows come first (0), then our bins, which count from the weakest (1)."""
    if kind == "random":
        return -1
    if kind == "top" or quantile is None:
        return 0
    return max(n_bins, int(quantile)) - int(quantile) + 1


def _chosen(b: FeatureBundle) -> dict | None:
    ok = [e for e in b.explanations if e["status"] == "ok"]
    for pick in (lambda e: e["is_best"], lambda e: bool(e["chosen"]), lambda e: True):
        for e in ok:
            if pick(e):
                return e
    return None


def _or_nan(v: float | None) -> float | str:
    """delphi writes a correlation it cannot compute as the string "nan"."""
    return v if v is not None and math.isfinite(v) else "nan"


def _simulation_file(b: FeatureBundle, e: dict, s: dict) -> list[dict] | None:
    seqs = []
    for m in b.simulations:
        if (m["explanation_id"], m["simulator"], m["split"]) != (e["explanation_id"], s["simulator"], s["split"]):
            continue
        true, pred = list(m["true_acts"]), list(m["predicted"])
        seqs.append({
            "distance": _distance(m["kind"], None),
            "simulation": {
                "tokens": list(m["tokens"] or []),
                "expected_activations": pred,
                "activation_scale": "simulated_normalized_activations",
                "distribution_values": [],
                "distribution_probabilities": [],
                "uncalibrated_simulation": None,
            },
            "true_activations": true,
            "ev_correlation_score": _or_nan(correlation(true, pred).value),
            "rsquared_score": 0,
            "absolute_dev_explained_score": 0,
        })
    value = _or_nan(s["value"])
    return [{"distance": 0, "scored_sequence_simulations": seqs, "ev_correlation_score": value,
             "rsquared_score": 0, "absolute_dev_explained_score": 0}]


def _classifier_file(b: FeatureBundle, s: dict) -> list[dict] | None:
    details = s["details"] if isinstance(s["details"], dict) else {}
    records = next((details[k] for k in _RECORD_LISTS if isinstance(details.get(k), list)), None)
    if not records:
        return None
    windows = {(w["seq_id"], w["start_pos"]): w for w in b.examples}
    n_bins = max((w.get("quantile") or 0 for w in b.examples), default=0)
    out = []
    for r in records:
        if not isinstance(r, dict):
            continue
        w = windows.get((r.get("seq_id"), r.get("start_pos")), {})
        activating = bool(_first(r, "activating", "is_activating", "label", "positive", default=False))
        prediction = _first(r, "prediction", "predicted", "pred")
        prediction = bool(prediction) if prediction is not None else None
        correct = _first(r, "correct")
        if correct is None and prediction is not None:
            correct = prediction == activating
        out.append({
            "str_tokens": list(_first(r, "str_tokens", "tokens", default=w.get("tokens", []))),
            "activations": list(_first(r, "activations", "acts", default=w.get("acts", []))),
            "distance": _first(r, "distance", "quantile",
                               default=_distance(_first(r, "kind", default=w.get("kind")), w.get("quantile"),
                                                 n_bins)),
            "activating": activating,
            "prediction": prediction,
            "probability": _first(r, "probability", "prob", "p"),
            "correct": correct,
        })
    return out


def _write_firing_counts(path: Path, module: str, width: int, n_active: dict[int, int]) -> None:
    import torch  # only here: the other exporters need no torch

    counts = torch.zeros(width, dtype=torch.int64)
    for feature_id, n in n_active.items():
        counts[feature_id] = n
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({module: counts}, buf)
    path.write_bytes(buf.getvalue())


def write_delphi(con, sources: list[dict], out: Path, *, on_feature: Callable[[], None] | None = None) -> dict:
    summary = {}
    for src in sources:
        run = out / src["source_id"]
        module = delphi_module(src)
        write_text(run / "run_config.json", dumps({
            "model": src["model_id"], "sparse_model": src.get("sae_path") or "",
            "hookpoints": [module], "sampler_cfg": {}, "constructor_cfg": {},
        }, compact=False) + "\n")
        (run / "explanations").mkdir(parents=True, exist_ok=True)
        n_expl, n_scores, n_active = 0, {}, {}
        for b in iter_feature_bundles(con, src["source_id"], simulations=True):
            n_active[b.feature_id] = int(b.stats.get("n_active") or 0)
            e = _chosen(b)
            if on_feature:
                on_feature()
            if e is None:
                continue
            name = f"{module}_latent{b.feature_id}.txt"
            write_text(run / "explanations" / name, dumps(e["text"], compact=True))
            n_expl += 1
            for scorer in sorted({s["scorer"] for s in e["scores"]}):
                s = preferred_score(e["scores"], scorer)
                content = _simulation_file(b, e, s) if scorer == "simulation" else _classifier_file(b, s)
                if content is None:
                    continue
                folder = SCORER_DIRS.get(scorer, scorer)
                write_text(run / "scores" / folder / name, dumps(content, compact=True))
                n_scores[folder] = n_scores.get(folder, 0) + 1
        _write_firing_counts(run / "log" / "hookpoint_firing_counts.pt", module, int(src["width"]), n_active)
        summary[src["source_id"]] = {"module": module, "explanations": n_expl, "scores": n_scores}
    return summary
