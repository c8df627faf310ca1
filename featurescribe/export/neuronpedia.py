"""Neuronpedia's bulk layout, as its own export (utils/neuronpedia-utils export-data.py) writes it.

    DIR/config/explanation_type.jsonl, explanation_model_type.jsonl,
               explanation_score_type.jsonl, explanation_score_model.jsonl
    DIR/{modelId}/{sourceId}/model.jsonl, source.jsonl, sourceset.jsonl
    DIR/{modelId}/{sourceId}/features/batch-N.jsonl.gz            rows of the Neuron table
    DIR/{modelId}/{sourceId}/activations/batch-N.jsonl.gz         rows of the Activation table
    DIR/{modelId}/{sourceId}/explanations/batch-N.jsonl.gz        rows of the Explanation table
    DIR/{modelId}/{sourceId}/explanation_scores/batch-N.jsonl.gz  rows of the ExplanationScore table

Keys are the Prisma column names. Feature and explanation files hold 1,024 rows each, in index
order; activations batch N holds the example windows of the features of features batch N. The
scores, which Neuronpedia's own export leaves out, sit in a folder of their own so that its
importer, which reads every file under `features/` and `explanations/`, does not mistake them
for features or explanations. Columns that are NOT NULL in Neuronpedia's schema and have a
database default (createdAt) are left out rather than written as null, since its importer turns
each line's keys into an INSERT's column list. `source.jsonl` has no `saelensConfig`: its importer
passes the line to Prisma's `create`, which refuses a null for a Json column (the column stays
NULL when the key is absent).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from featurescribe.export.common import (
    Batches,
    GzipJsonl,
    dumps,
    model_name_of,
    neuronpedia_model_id,
    source_set_name,
    stable_id,
    write_text,
)
from featurescribe.export.tabular import lift_of
from featurescribe.store.export_queries import FeatureBundle, iter_feature_bundles

BATCH = 1024
ACTIVATION_KINDS = ("top", "quantile")  # Neuronpedia shows activating texts; random windows stay out
CREATOR_NAME = "featurescribe"

SCORER_DESCRIPTIONS = {
    "simulation": "Pearson correlation between an LLM's simulated activations from the explanation "
                  "and the true activations on held-out top and random windows (Bills et al. 2023).",
    "detection": "Balanced accuracy of an LLM judging which held-out windows match the explanation "
                 "(Paulo et al. 2024).",
    "fuzzing": "Balanced accuracy of an LLM judging whether the highlighted tokens of held-out "
               "windows match the explanation (Paulo et al. 2024).",
    "intervention": "Accuracy of an LLM judging which of two continuations of neutral prompts (the feature "
                    "steered at a strength calibrated to a target next-token KL, or not) the explanation "
                    "describes; what the feature does to the output.",
}


def _feature_row(b: FeatureBundle, model: str, src: dict, creator_id: str) -> dict[str, Any]:
    s = b.stats
    heights: list[float] = []
    centers: list[float] = []
    if b.histogram:
        lo, hi, counts = b.histogram["lo"], b.histogram["hi"], b.histogram["counts"]
        width = (hi - lo) / len(counts) if counts else 0.0
        heights = [float(c) for c in counts]
        centers = [round(lo + (i + 0.5) * width, 6) for i in range(len(counts))]
    return {
        "modelId": model,
        "layer": src["source_id"],
        "index": str(b.feature_id),
        "maxActApprox": s["max_act"] if s["max_act"] is not None else 0.0,
        "creatorId": creator_id,
        "frac_nonzero": float(s["frac_active"] or 0.0),
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": centers,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "neuron_alignment_indices": [],
        "neuron_alignment_l1": [],
        "neuron_alignment_values": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "decoder_weights_dist": [],
        # what steering the feature does to the next token (label --output-effects), when measured
        "neg_str": s.get("output_falling") or [],
        "neg_values": s.get("output_falling_delta") or [],
        "pos_str": s.get("output_rising") or [],
        "pos_values": s.get("output_rising_delta") or [],
        "sourceSetName": source_set_name(src["source_id"]),
        "topkCosSimIndices": [],
        "topkCosSimValues": [],
        "vector": [],
        "vectorLabel": None,
        "hookName": src["hook_name"],
        "vectorDefaultSteerStrength": 10.0,
        "hasVector": False,
    }


def _activation_row(b: FeatureBundle, w: dict, model: str, src: dict, creator_id: str) -> dict[str, Any]:
    values = w["acts"]
    top = max(values)
    return {
        "id": stable_id(model, src["source_id"], b.feature_id, w["kind"], w["split"], w["seq_id"], w["start_pos"]),
        "modelId": model,
        "layer": src["source_id"],
        "index": str(b.feature_id),
        "creatorId": creator_id,
        "dataSource": src.get("corpus"),
        "dataIndex": str(w["seq_id"]),
        "tokens": w["tokens"],
        "maxValue": top,
        "minValue": min(values),
        "values": values,
        "maxValueTokenIndex": values.index(top),
        "dfaValues": [],
        "dfaMaxValue": None,
        "dfaTargetIndex": None,
        "binContains": None,
        "binMin": None,
        "binMax": None,
    }


def _explanation_row(b: FeatureBundle, e: dict, model: str, src: dict, creator_id: str) -> dict[str, Any]:
    return {
        "id": e["explanation_id"],
        "modelId": model,
        "layer": src["source_id"],
        "index": str(b.feature_id),
        "authorId": creator_id,
        "description": e["text"],
        "embedding": None,
        "typeName": f"featurescribe_{e['method']}",
        "explanationModelName": model_name_of(e["explainer"]),
        "umap_x": None,
        "umap_y": None,
        "umap_cluster": None,
        "umap_log_feature_sparsity": None,
    }


def _score_row(e: dict, i: int, s: dict, creator_id: str) -> dict[str, Any]:
    details = {
        "split": s["split"],
        "simulator": s["simulator"],
        "n_examples": s["n_examples"],
        "baseline_shuffled": s["baseline_shuffled"],
        "baseline_tokens": s["baseline_tokens"],
        "baseline_population": s.get("baseline_population"),
        "lift": lift_of(s),
        "details": s["details"],
    }
    return {
        "id": stable_id(e["explanation_id"], "score", i),
        "initiatedByUserId": creator_id,
        "value": s["value"],
        "explanationId": e["explanation_id"],
        "explanationScoreTypeName": f"featurescribe_{s['scorer']}",
        "explanationScoreModelName": model_name_of(s["simulator"]),
        "jsonDetails": dumps(details, compact=True),
    }


def _config_rows(names: dict[str, dict[str, str]], creator_id: str) -> dict[str, list[dict]]:
    def base(name: str, display: str, description: str) -> dict:
        return {"name": name, "displayName": display, "description": description, "featured": False}

    out: dict[str, list[dict]] = {k: [] for k in (
        "explanation_type", "explanation_model_type", "explanation_score_type", "explanation_score_model")}
    for name, method in sorted(names["explanation_type"].items()):
        out["explanation_type"].append({
            **base(name, f"featurescribe {method}", f"featurescribe's '{method}' explainer"),
            "isAttention": False, "settings": None, "url": None,
            "creatorName": CREATOR_NAME, "creatorId": creator_id})
    for name, spec in sorted(names["explanation_model_type"].items()):
        out["explanation_model_type"].append({
            **base(name, name, f"explainer backend {spec}"), "openRouterModelId": None, "url": None,
            "creatorName": CREATOR_NAME})
    for name, scorer in sorted(names["explanation_score_type"].items()):
        out["explanation_score_type"].append({
            **base(name, f"featurescribe {scorer}", SCORER_DESCRIPTIONS.get(scorer, f"featurescribe's {scorer} scorer")),
            "isAttention": False, "scoreDescription": None, "scorerModel": None, "settings": None, "url": None,
            "creatorName": CREATOR_NAME, "creatorId": creator_id})
    for name, spec in sorted(names["explanation_score_model"].items()):
        out["explanation_score_model"].append({
            **base(name, name, f"simulator or judge {spec}"), "openRouterModelId": None, "url": None,
            "creatorName": CREATOR_NAME})
    return out


def _metadata(src: dict, model: str, all_sources: list[dict], n_sequences: int, creator_id: str) -> dict[str, dict]:
    same_model = [s for s in all_sources if s["model_id"] == src["model_id"]]
    neurons = [s for s in same_model if s["kind"] == "neuron"]  # the MLP width, when we know it
    # a hub name `org/name` has an owner; an alias or a local folder has none
    owner = src["model_id"].split("/")[0] if re.fullmatch(r"[\w.-]+/[\w.-]+", src["model_id"]) else ""
    set_name = source_set_name(src["source_id"])
    kind = "neurons" if src["kind"] == "neuron" else "SAE latents"
    return {
        "model": {
            "id": model, "displayNameShort": model, "displayName": src["model_id"], "creatorId": creator_id,
            "tlensId": None, "dimension": None, "visibility": "PUBLIC", "instruct": False,
            "inferenceEnabled": False, "layers": max(s["layer"] for s in same_model) + 1,
            "neuronsPerLayer": max(s["width"] for s in neurons or same_model), "owner": owner,
        },
        "sourceset": {
            "modelId": model, "name": set_name, "creatorId": creator_id, "hasDashboards": True,
            "visibility": "PUBLIC", "description": f"{src['site'] or set_name} {kind}, {src['width']} wide",
            "type": "", "creatorName": CREATOR_NAME, "urls": [], "releaseName": None,
        },
        "source": {
            "id": src["source_id"], "modelId": model, "setName": set_name, "creatorId": creator_id,
            "hasDashboards": True, "inferenceEnabled": False, "visibility": "PUBLIC",
            "saelensRelease": None, "saelensSaeId": None,
            "hfRepoId": None, "hfFolderId": None, "num_prompts": n_sequences,
            "num_tokens_in_prompt": src.get("ctx"), "dataset": src.get("corpus"),
            "notes": f"featurescribe export; hook {src['hook_name']}, {src['kind']}, width {src['width']}",
        },
    }


class _SourceWriter:
    """One source's batch files; `names` collects the explanation and score types used."""

    def __init__(self, d: Path, model: str, src: dict, creator_id: str, names: dict[str, dict[str, str]]):
        self.d, self.model, self.src, self.creator_id, self.names = d, model, src, creator_id, names
        self.features = Batches(d / "features", BATCH)
        self.explanations = Batches(d / "explanations", BATCH)
        self.scores = Batches(d / "explanation_scores", BATCH)
        self.acts: GzipJsonl | None = None
        self.acts_batch = -1
        self.n_acts = 0

    def feature(self, batch: int, b) -> None:
        self.features.write(_feature_row(b, self.model, self.src, self.creator_id))
        for w in b.examples:
            if w["tokens"]:
                self._activation(batch, b, w)
        for e in b.explanations:
            if e["status"] == "ok":
                self._explanation(b, e)

    def _activation(self, batch: int, b, w: dict) -> None:
        if self.acts is None or self.acts_batch != batch:  # activations batch N: features batch N's
            if self.acts is not None:
                self.acts.close()
            self.acts_batch = batch
            self.acts = GzipJsonl(self.d / "activations" / f"batch-{batch}.jsonl.gz")
        self.acts.write(_activation_row(b, w, self.model, self.src, self.creator_id))
        self.n_acts += 1

    def _explanation(self, b, e: dict) -> None:
        self.explanations.write(_explanation_row(b, e, self.model, self.src, self.creator_id))
        self.names["explanation_type"][f"featurescribe_{e['method']}"] = e["method"]
        self.names["explanation_model_type"][model_name_of(e["explainer"])] = e["explainer"]
        for k, s in enumerate(e["scores"]):
            self.scores.write(_score_row(e, k, s, self.creator_id))
            self.names["explanation_score_type"][f"featurescribe_{s['scorer']}"] = s["scorer"]
            self.names["explanation_score_model"][model_name_of(s["simulator"])] = s["simulator"] or "none"

    def close(self) -> None:
        for w in (self.features, self.explanations, self.scores):
            w.close()
        if self.acts is not None:
            self.acts.close()


def write_neuronpedia(
    con,
    sources: list[dict],
    out: Path,
    *,
    all_sources: list[dict] | None = None,
    n_sequences: int = 0,
    creator_id: str = CREATOR_NAME,
    on_feature: Callable[[], None] | None = None,
) -> dict[str, Any]:
    all_sources = all_sources or sources
    names: dict[str, dict[str, str]] = {k: {} for k in (
        "explanation_type", "explanation_model_type", "explanation_score_type", "explanation_score_model")}
    summary: dict[str, Any] = {}
    for src in sources:
        model = neuronpedia_model_id(src["model_id"])
        d = out / model / src["source_id"]
        for name, row in _metadata(src, model, all_sources, n_sequences, creator_id).items():
            write_text(d / f"{name}.jsonl", dumps(row) + "\n")
        writer = _SourceWriter(d, model, src, creator_id, names)
        try:
            for i, b in enumerate(iter_feature_bundles(
                con, src["source_id"], example_kinds=ACTIVATION_KINDS, histogram=True,
            )):
                writer.feature(i // BATCH, b)
                if on_feature:
                    on_feature()
        finally:
            writer.close()
        summary[src["source_id"]] = {
            "path": f"{model}/{src['source_id']}", "features": writer.features.rows,
            "activations": writer.n_acts, "explanations": writer.explanations.rows,
            "explanation_scores": writer.scores.rows,
        }
    for name, rows in _config_rows(names, creator_id).items():
        write_text(out / "config" / f"{name}.jsonl", "".join(dumps(r) + "\n" for r in rows))
    return summary
