"""OpenAI's neuron-explainer layout (openai/automated-interpretability).

    DIR/{sourceId}/neurons/{layer}/{index}.json        one NeuronRecord per feature
    DIR/{sourceId}/explanations/{layer}/{index}.jsonl  one NeuronSimulationResults line per feature

Both are the JSON that project's `fast_dataclasses.dumps` writes for its dataclasses: each
object carries its fields in declaration order and then `"dataclass_name"`, the tag its
`loads` uses to rebuild the dataclass; NaN is written as null, as orjson does. So
`read_neuron_file(DIR/{sourceId}/neurons/{layer}/{index}.json)`, `load_neuron(layer, index,
"file://DIR/{sourceId}/neurons")`, `get_sorted_neuron_indices(DIR/{sourceId}, layer)` and
`load_neuron_explanations(DIR/{sourceId}/explanations, layer, index)` all read it.

A NeuronRecord's `most_positive_activation_records` are the feature's top windows (all splits,
strongest first), `random_sample` its random windows, `random_sample_by_quantile` its quantile
windows by bin, weakest bin first, one list per bin (empty when the bin has no window; null when
the feature has no quantile windows); every alive feature has them, sampled by a label run or
read from `activations`. The moments (mean, variance, skewness, excess kurtosis) are over every
harvested token, a token below the source's threshold (not stored) counting as 0, and the quantile
boundaries are the quartiles of the feature's per-sequence peaks (store/moments.py); null for a
dead feature.
Each scored explanation's simulation is the stored one behind its simulation score (the test
split first): the simulator's predictions on the 0-10 scale (`simulated_normalized_activations`),
the true activations, a per-window correlation, and the stored score as the overall
`ev_correlation_score`. The simulators record expected values, not distributions, so each
token's `distribution_values` and `distribution_probabilities` are empty lists. Explanations
with no simulation score (detection and fuzzing have no place in this format) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from featurescribe.export.common import dumps, preferred_score, write_text
from featurescribe.scorers.metrics import correlation
from featurescribe.store.export_queries import FeatureBundle, iter_feature_bundles


def _dc(name: str, **fields: Any) -> dict[str, Any]:
    """A dataclass as fast_dataclasses serialises it: its fields, then its type tag."""
    fields["dataclass_name"] = name
    return fields


def _record(w: dict) -> dict:
    return _dc("ActivationRecord", tokens=w["tokens"], activations=w["acts"])


def _neuron_id(layer: int, index: int) -> dict:
    return _dc("NeuronId", layer_index=int(layer), neuron_index=int(index))


def _by_quantile(b: FeatureBundle) -> list[list[dict]] | None:
    """One list per bin, weakest first, empty where the bin has no window, so that list i goes with
    the i-th interval of `quantile_boundaries` (the sampler numbers its bins from 1, the weakest)."""
    windows = b.windows("quantile")
    if not windows:
        return None
    index = [max((w["quantile"] or 1) - 1, 0) for w in windows]
    bounds = (b.moments or {}).get("quantile_boundaries") or []
    out: list[list[dict]] = [[] for _ in range(max(len(bounds) + 1 if bounds else 0, max(index) + 1))]
    for i, w in zip(index, windows):
        out[i].append(_record(w))
    return out


def neuron_record(b: FeatureBundle, layer: int) -> dict:
    return _dc(
        "NeuronRecord",
        neuron_id=_neuron_id(layer, b.feature_id),
        random_sample=[_record(w) for w in b.windows("random")],
        random_sample_by_quantile=_by_quantile(b),
        **{k: (b.moments or {}).get(k) for k in ("quantile_boundaries", "mean", "variance", "skewness", "kurtosis")},
        most_positive_activation_records=[_record(w) for w in b.windows("top")],
    )


def simulation_results(b: FeatureBundle, layer: int) -> dict | None:
    scored = []
    ordered = sorted(
        (e for e in b.explanations if e["status"] == "ok"),
        key=lambda e: (not e["is_best"], e["candidate"] if e["candidate"] is not None else 1 << 30,
                       e["explanation_id"]),
    )
    for e in ordered:
        s = preferred_score(e["scores"], "simulation")
        if s is None:
            continue
        seqs = []
        for m in b.simulations:
            if (m["explanation_id"], m["simulator"], m["split"]) != (e["explanation_id"], s["simulator"], s["split"]):
                continue
            tokens = list(m["tokens"] or [])
            true, pred = list(m["true_acts"]), list(m["predicted"])
            simulation = _dc(
                "SequenceSimulation",
                tokens=tokens,
                expected_activations=pred,
                activation_scale="simulated_normalized_activations",
                distribution_values=[[] for _ in pred],
                distribution_probabilities=[[] for _ in pred],
                uncalibrated_simulation=None,
            )
            seqs.append(_dc(
                "ScoredSequenceSimulation",
                simulation=simulation,
                true_activations=true,
                ev_correlation_score=correlation(true, pred).value,
                rsquared_score=None,
                absolute_dev_explained_score=None,
            ))
        scored.append(_dc(
            "ScoredExplanation",
            explanation=e["text"],
            scored_simulation=_dc(
                "ScoredSimulation",
                scored_sequence_simulations=seqs,
                ev_correlation_score=s["value"],
                rsquared_score=None,
                absolute_dev_explained_score=None,
            ),
        ))
    if not scored:
        return None
    return _dc("NeuronSimulationResults", neuron_id=_neuron_id(layer, b.feature_id), scored_explanations=scored)


def write_oai(con, sources: list[dict], out: Path, *, on_feature: Callable[[], None] | None = None) -> dict:
    summary = {}
    for src in sources:
        layer = int(src["layer"])
        neurons = out / src["source_id"] / "neurons" / str(layer)
        explanations = out / src["source_id"] / "explanations" / str(layer)
        neurons.mkdir(parents=True, exist_ok=True)
        explanations.mkdir(parents=True, exist_ok=True)
        n_records = n_results = 0
        for b in iter_feature_bundles(con, src["source_id"], simulations=True, with_moments=True):
            write_text(neurons / f"{b.feature_id}.json", dumps(neuron_record(b, layer), compact=True))
            n_records += 1
            results = simulation_results(b, layer)
            if results is not None:
                write_text(explanations / f"{b.feature_id}.jsonl", dumps(results, compact=True) + "\n")
                n_results += 1
            if on_feature:
                on_feature()
        summary[src["source_id"]] = {"layer": layer, "neuron_records": n_records, "simulation_results": n_results}
    return summary
