"""`featurescribe export`: every format read back and compared with the database."""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import duckdb
import pyarrow.parquet as pq
import numpy as np
import pytest

from featurescribe.cli import main
from featurescribe.store import open_db
from featurescribe.store.activation_store import STORAGE_TABLES
from tests.export_fixtures import build_large_db
from tests.mounts import tmpfs

FORMATS = ["neuronpedia", "oai", "delphi", "parquet", "json"]


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    """Each format exported once from the demo database: {format: folder}."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in FORMATS:
        out[fmt] = root / fmt
        assert main(["export", "--db", demo, "--format", fmt, "--out", str(out[fmt])]) == 0
    return out


_READERS: dict[str, duckdb.DuckDBPyConnection] = {}


def q(db: str, sql: str, params=None) -> list[tuple]:
    """Run a query on a read-only connection kept open per database for the whole module."""
    if db not in _READERS:
        _READERS[db] = open_db(db, read_only=True, create=False)
    return _READERS[db].cursor().execute(sql, params or []).fetchall()


@pytest.fixture(scope="module", autouse=True)
def _close_readers():
    yield
    while _READERS:
        _READERS.popitem()[1].close()


def window_acts(db: str, source: str, feature: int, seq_id: int, start: int, end: int) -> list[float]:
    """The dense activations of a window, straight from `activations`."""
    rows = dict(q(db, """SELECT pos, act FROM activations WHERE source_id = ? AND feature_id = ?
                         AND seq_id = ? AND pos >= ? AND pos < ?""", [source, feature, seq_id, start, end]))
    return [rows.get(p, 0.0) for p in range(start, end)]


def close(a, b, tol=1e-6) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b))


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def batches(folder: Path) -> list[Path]:
    return sorted(folder.glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))


# ---------------------------------------------------------------------------------------------
# Neuronpedia

NP_FEATURE_KEYS = [
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "neuron_alignment_indices", "neuron_alignment_l1",
    "neuron_alignment_values", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "decoder_weights_dist", "neg_str", "neg_values", "pos_str",
    "pos_values", "sourceSetName", "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel",
    "hookName", "vectorDefaultSteerStrength", "hasVector",
]
NP_ACTIVATION_KEYS = [
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "dataIndex", "tokens", "maxValue",
    "minValue", "values", "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex",
    "binContains", "binMin", "binMax",
]
NP_EXPLANATION_KEYS = [
    "id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName",
    "explanationModelName", "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity",
]
NP_SCORE_KEYS = [
    "id", "initiatedByUserId", "value", "explanationId", "explanationScoreTypeName",
    "explanationScoreModelName", "jsonDetails",
]


def _check_np_features(demo: str, d: Path, source: str, model_id: str, width: int) -> None:
    """Neuron rows, index order, keys and types as Neuronpedia has them."""
    feats = [r for p in batches(d / "features") for r in read_jsonl_gz(p)]
    db_feats = q(demo, "SELECT feature_id, frac_active, max_act FROM features WHERE source_id = ? ORDER BY 1", [source])
    assert [int(r["index"]) for r in feats] == [f[0] for f in db_feats] == list(range(width))
    for r, (fid, frac, mx) in zip(feats, db_feats):
        assert list(r) == NP_FEATURE_KEYS
        assert r["modelId"] == model_id and r["layer"] == source and r["index"] == str(fid)
        assert isinstance(r["index"], str) and isinstance(r["maxActApprox"], float)
        assert isinstance(r["frac_nonzero"], float) and math.isclose(r["frac_nonzero"], frac)
        assert math.isclose(r["maxActApprox"], mx or 0.0, rel_tol=1e-6)
        assert r["hasVector"] is False and r["vector"] == []
        assert len(r["freq_hist_data_bar_heights"]) == len(r["freq_hist_data_bar_values"])
        n_active = q(demo, "SELECT n_active FROM features WHERE source_id = ? AND feature_id = ?", [source, fid])[0][0]
        assert sum(r["freq_hist_data_bar_heights"]) == n_active


def _check_np_activations(demo: str, d: Path, source: str) -> None:
    """One row per top/quantile window, values equal to the activations table."""
    acts = [r for p in batches(d / "activations") for r in read_jsonl_gz(p)]
    n_windows = q(demo, "SELECT count(*) FROM examples WHERE source_id = ? AND kind IN ('top', 'quantile')", [source])[0][0]
    assert len(acts) == n_windows
    assert [int(r["index"]) for r in acts] == sorted(int(r["index"]) for r in acts)
    for r in acts:
        assert list(r) == NP_ACTIVATION_KEYS
        assert all(isinstance(t, str) for t in r["tokens"]) and all(isinstance(v, float) for v in r["values"])
        assert len(r["tokens"]) == len(r["values"]) > 0
        assert r["maxValue"] == max(r["values"]) and r["minValue"] == min(r["values"])
        assert isinstance(r["maxValueTokenIndex"], int) and r["values"][r["maxValueTokenIndex"]] == r["maxValue"]
        assert len(r["id"]) == 25 and r["id"].startswith("c")
    for r in acts[:: max(1, len(acts) // 15)]:
        seq = int(r["dataIndex"])
        start, end = q(demo, """SELECT start_pos, end_pos FROM examples WHERE source_id = ? AND feature_id = ?
                                AND seq_id = ? AND kind IN ('top', 'quantile') ORDER BY start_pos""",
                       [source, int(r["index"]), seq])[0]
        assert close(r["values"], window_acts(demo, source, int(r["index"]), seq, start, end))
        tokens = q(demo, "SELECT tokens[? + 1 : ?] FROM sequences WHERE seq_id = ?", [start, end, seq])[0][0]
        assert r["tokens"] == tokens
    assert len({r["id"] for r in acts}) == len(acts)


def _check_np_explanations(demo: str, d: Path, source: str, model_id: str) -> None:
    """The explanations that did not fail, in index order."""
    expl = [r for p in batches(d / "explanations") for r in read_jsonl_gz(p)]
    db_expl = q(demo, """SELECT explanation_id, feature_id, text FROM explanations
                         WHERE source_id = ? AND coalesce(status, 'ok') = 'ok'
                         ORDER BY feature_id, candidate, explanation_id""", [source])
    assert [(r["id"], int(r["index"]), r["description"]) for r in expl] == [tuple(x) for x in db_expl]
    for r in expl:
        assert list(r) == NP_EXPLANATION_KEYS
        assert r["layer"] == source and r["modelId"] == model_id and isinstance(r["index"], str)
        assert r["typeName"].startswith("featurescribe_") and r["explanationModelName"]


def _check_np_scores(demo: str, d: Path, source: str) -> None:
    """ExplanationScore rows with the baselines in jsonDetails."""
    scores = [r for p in batches(d / "explanation_scores") for r in read_jsonl_gz(p)]
    db_scores = q(demo, """SELECT s.explanation_id, s.scorer, s.value, s.baseline_shuffled
                           FROM scores s JOIN explanations e USING (explanation_id)
                           WHERE e.source_id = ? ORDER BY 1, 2, s.split""", [source])
    assert len(scores) == len(db_scores)
    got = sorted((r["explanationId"], r["explanationScoreTypeName"].removeprefix("featurescribe_"), r["value"],
                  json.loads(r["jsonDetails"])["baseline_shuffled"]) for r in scores)
    assert got == sorted(tuple(x) for x in db_scores)
    for r in scores:
        assert list(r) == NP_SCORE_KEYS and isinstance(r["value"], float)
        details = json.loads(r["jsonDetails"])
        assert {"split", "baseline_shuffled", "baseline_tokens", "lift", "details"} <= set(details)


def test_neuronpedia_layout_keys_types_and_content(demo, exported):
    root = exported["neuronpedia"]
    assert sorted(p.name for p in (root / "config").iterdir()) == [
        "explanation_model_type.jsonl", "explanation_score_model.jsonl",
        "explanation_score_type.jsonl", "explanation_type.jsonl"]
    for (source, model_id, width) in q(demo, "SELECT source_id, model_id, width FROM sources ORDER BY 1"):
        d = root / model_id / source
        for meta in ("model.jsonl", "source.jsonl", "sourceset.jsonl"):
            assert len((d / meta).read_text().splitlines()) == 1
        assert json.loads((d / "source.jsonl").read_text())["id"] == source
        _check_np_features(demo, d, source, model_id, width)
        _check_np_activations(demo, d, source)
        _check_np_explanations(demo, d, source, model_id)
        _check_np_scores(demo, d, source)


# Neuronpedia's importer (apps/webapp/app/api/admin/import/route.ts) passes each line of
# model.jsonl, sourceset.jsonl and source.jsonl to Prisma's `create({data: line})`, which refuses a
# key that is not a field of the model and a null for a Json field. The fields are those of
# apps/webapp/prisma/schema.prisma (models Model, SourceSet, Source); Source.saelensConfig is Json?.
NP_METADATA_FIELDS = {
    "model.jsonl": {
        "id", "displayNameShort", "displayName", "creatorId", "tlensId", "openRouterId", "dimension",
        "thinking", "visibility", "defaultSourceSetName", "defaultSourceId", "defaultGraphSourceSetName",
        "inferenceEnabled", "instruct", "layers", "neuronsPerLayer", "createdAt", "owner", "updatedAt", "website"},
    "sourceset.jsonl": {
        "modelId", "name", "hasDashboards", "allowInferenceSearch", "visibility", "description", "type",
        "creatorName", "urls", "creatorEmail", "creatorId", "releaseName", "hasGraphs", "graphEnabled",
        "similarityMatrixEnabled", "defaultOfModelId", "defaultGraphModelId", "defaultRange",
        "defaultShowBreaks", "showDfa", "showCorrelated", "showHeadAttribution", "showUmap", "createdAt"},
    "source.jsonl": {
        "id", "modelId", "hasDashboards", "inferenceEnabled", "saelensConfig", "saelensRelease", "saelensSaeId",
        "hfRepoId", "hfFolderId", "visibility", "defaultOfModelId", "setName", "creatorId", "hasUmap",
        "hasUmapLogSparsity", "hasUmapClusters", "num_prompts", "num_tokens_in_prompt", "dataset", "notes",
        "cosSimMatchModelId", "cosSimMatchSourceId", "createdAt"},
}
NP_JSON_FIELDS = {"source.jsonl": {"saelensConfig"}}


def test_neuronpedia_metadata_lines_pass_prisma_create(exported):
    root = exported["neuronpedia"]
    source_dirs = [s for m in root.iterdir() if m.is_dir() and m.name != "config" for s in m.iterdir()]
    for d in source_dirs:
        for name, fields in NP_METADATA_FIELDS.items():
            row = json.loads((d / name).read_text())
            assert set(row) <= fields, (name, set(row) - fields)
            for key in NP_JSON_FIELDS.get(name, ()):
                assert row.get(key, "absent") is not None, f"{name}: {key} is null, which Prisma refuses"


def test_neuronpedia_config_defines_every_name_used(exported):
    """Every name an explanation or score refers to is defined in config."""
    root = exported["neuronpedia"]
    cfg = {p.stem: {json.loads(line)["name"] for line in p.read_text().splitlines()} for p in (root / "config").iterdir()}
    source_dirs = [s for m in root.iterdir() if m.is_dir() and m.name != "config" for s in m.iterdir()]
    assert len(source_dirs) == 2
    for d in source_dirs:
        for r in (r for p in batches(d / "explanations") for r in read_jsonl_gz(p)):
            assert r["typeName"] in cfg["explanation_type"] and r["explanationModelName"] in cfg["explanation_model_type"]
        for r in (r for p in batches(d / "explanation_scores") for r in read_jsonl_gz(p)):
            assert r["explanationScoreTypeName"] in cfg["explanation_score_type"]
            assert r["explanationScoreModelName"] in cfg["explanation_score_model"]


def test_neuronpedia_batches_of_1024_and_gzip_header(tmp_path):
    db = str(tmp_path / "big.duckdb")
    build_large_db(db, 2100, windows=2, window_len=4)
    out = tmp_path / "np"
    assert main(["export", "--db", db, "--format", "neuronpedia", "--out", str(out)]) == 0
    d = out / "big-model-1b" / "8-res-sae1m"  # org/Big-Model-1B -> big-model-1b
    sizes = [len(read_jsonl_gz(p)) for p in batches(d / "features")]
    assert sizes == [1024, 1024, 52]
    for n, p in enumerate(batches(d / "features")):
        assert [int(r["index"]) for r in read_jsonl_gz(p)] == list(range(n * 1024, min(2100, (n + 1) * 1024)))
    for n, p in enumerate(batches(d / "activations")):
        idx = {int(r["index"]) for r in read_jsonl_gz(p)}
        assert min(idx) >= n * 1024 and max(idx) < (n + 1) * 1024
    assert [len(read_jsonl_gz(p)) for p in batches(d / "explanations")] == [1024, 1024, 52]
    raw = (d / "features" / "batch-0.jsonl.gz").read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"  # no name, mtime 0


# ---------------------------------------------------------------------------------------------
# OpenAI neuron-explainer: a reader that follows its fast_dataclasses format


_BY_NAME: dict[str, type] = {}
_BY_FIELDS: dict[frozenset, type] = {}


@dataclass
class _Tagged:
    dataclass_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.dataclass_name = type(self).__name__


def _register(cls):
    assert is_dataclass(cls)
    _BY_NAME[cls.__name__] = cls
    _BY_FIELDS[frozenset(f.name for f in fields(cls) if f.name != "dataclass_name")] = cls
    return cls


@_register
@dataclass
class ActivationRecord(_Tagged):
    tokens: list[str]
    activations: list[float]


@_register
@dataclass
class NeuronId(_Tagged):
    layer_index: int
    neuron_index: int


@_register
@dataclass
class NeuronRecord(_Tagged):
    neuron_id: NeuronId
    random_sample: list = field(default_factory=list)
    random_sample_by_quantile: Optional[list] = None
    quantile_boundaries: Optional[list] = None
    mean: Optional[float] = math.nan
    variance: Optional[float] = math.nan
    skewness: Optional[float] = math.nan
    kurtosis: Optional[float] = math.nan
    most_positive_activation_records: list = field(default_factory=list)


@_register
@dataclass
class SequenceSimulation(_Tagged):
    tokens: list
    expected_activations: list
    activation_scale: str
    distribution_values: list
    distribution_probabilities: list
    uncalibrated_simulation: Optional[Any] = None


@_register
@dataclass
class ScoredSequenceSimulation(_Tagged):
    simulation: SequenceSimulation
    true_activations: list
    ev_correlation_score: float
    rsquared_score: Optional[float] = None
    absolute_dev_explained_score: Optional[float] = None


@_register
@dataclass
class ScoredSimulation(_Tagged):
    scored_sequence_simulations: list
    ev_correlation_score: Optional[float] = None
    rsquared_score: Optional[float] = None
    absolute_dev_explained_score: Optional[float] = None


@_register
@dataclass
class ScoredExplanation(_Tagged):
    explanation: str
    scored_simulation: ScoredSimulation


@_register
@dataclass
class NeuronSimulationResults(_Tagged):
    neuron_id: NeuronId
    scored_explanations: list


def _hook(d: Any, backwards_compatible: bool = True) -> Any:
    """The object hook of the format: the type tag picks the dataclass (or, without a tag, the
    exact or a superset field set); unknown or missing fields make the constructor fail."""
    if isinstance(d, list):
        return [_hook(x, backwards_compatible) for x in d]
    if not isinstance(d, dict):
        return d
    cls = None
    if "dataclass_name" in d:
        cls = _BY_NAME.get(d["dataclass_name"])
        assert cls is not None or backwards_compatible
    elif backwards_compatible and d:
        keys = frozenset(d)
        cls = _BY_FIELDS.get(keys) or next((c for k, c in _BY_FIELDS.items() if keys <= k), None)
    new = {k: _hook(v, backwards_compatible) for k, v in d.items() if k != "dataclass_name"}
    return cls(**new) if cls is not None else new


def oai_loads(text: str, backwards_compatible: bool = True) -> Any:
    return json.loads(text, object_hook=partial(_hook, backwards_compatible=backwards_compatible))


def check_moments(db, source, fid, rec) -> None:
    """The record's moments are those of every harvested token (unstored ones as 0)."""
    acts = np.asarray([r[0] for r in q(db, "SELECT act FROM activations WHERE source_id = ? AND feature_id = ?",
                                       [source, fid])], dtype=np.float64)
    if acts.size == 0:
        assert rec.mean is None and rec.quantile_boundaries is None  # NaN in the format is null
        return
    n_tokens = q(db, "SELECT coalesce(n_tokens, 0) FROM sources WHERE source_id = ?", [source])[0][0]
    x = np.concatenate([acts, np.zeros(max(0, n_tokens - acts.size))])
    mean, var = x.mean(), x.var()
    assert rec.mean == pytest.approx(mean, rel=1e-5) and rec.variance == pytest.approx(var, rel=1e-4)
    if var > 0:
        z = (x - mean) / np.sqrt(var)
        assert rec.skewness == pytest.approx((z ** 3).mean(), rel=1e-3, abs=1e-6)
        assert rec.kurtosis == pytest.approx((z ** 4).mean() - 3, rel=1e-3, abs=1e-6)
    assert len(rec.quantile_boundaries) == 3 and rec.quantile_boundaries == sorted(rec.quantile_boundaries)


def test_oai_records_read_back_with_the_format_loader(demo, exported):
    root = exported["oai"]
    for source, layer in q(demo, "SELECT source_id, layer FROM sources ORDER BY 1"):
        layer_dir = root / source / "neurons" / str(layer)
        ids = sorted(int(p.stem) for p in layer_dir.iterdir() if p.stem.isnumeric())  # get_sorted_neuron_indices
        assert ids == [r[0] for r in q(demo, "SELECT feature_id FROM features WHERE source_id = ? ORDER BY 1", [source])]
        for fid in ids:
            text = (layer_dir / f"{fid}.json").read_text()
            rec = oai_loads(text, backwards_compatible=False)  # every object carries its tag
            assert isinstance(rec, NeuronRecord) and isinstance(rec.neuron_id, NeuronId)
            assert (rec.neuron_id.layer_index, rec.neuron_id.neuron_index) == (layer, fid)
            top = q(demo, """SELECT seq_id, start_pos, end_pos FROM examples WHERE source_id = ? AND feature_id = ?
                             AND kind = 'top'""", [source, fid])
            assert len(rec.most_positive_activation_records) == len(top)
            assert all(isinstance(r, ActivationRecord) for r in rec.most_positive_activation_records)
            maxes = [max(r.activations) for r in rec.most_positive_activation_records]
            assert maxes == sorted(maxes, reverse=True)
            expected = sorted((window_acts(demo, source, fid, s, a, b) for s, a, b in top), key=max, reverse=True)
            assert sorted(map(max, expected), reverse=True) == pytest.approx(maxes)
            n_random = q(demo, "SELECT count(*) FROM examples WHERE source_id = ? AND feature_id = ? AND kind = 'random'",
                         [source, fid])[0][0]
            assert len(rec.random_sample) == n_random
            n_quant = q(demo, "SELECT count(*) FROM examples WHERE source_id = ? AND feature_id = ? AND kind = 'quantile'",
                        [source, fid])[0][0]
            assert (rec.random_sample_by_quantile is None) == (n_quant == 0)
            check_moments(demo, source, fid, rec)

            # scored explanations: one line, the stored simulation score and its windows
            path = root / source / "explanations" / str(layer) / f"{fid}.jsonl"
            sims = q(demo, """SELECT e.text, s.value FROM explanations e JOIN scores s USING (explanation_id)
                              WHERE e.source_id = ? AND e.feature_id = ? AND s.scorer = 'simulation'
                              AND s.split = 'test' ORDER BY e.candidate""", [source, fid])
            if not sims:
                assert not path.exists()
                continue
            lines = [ln for ln in path.read_text().split("\n") if ln]
            assert len(lines) == 1
            res = oai_loads(lines[0])
            assert isinstance(res, NeuronSimulationResults)
            assert sorted((e.explanation, e.scored_simulation.ev_correlation_score) for e in res.scored_explanations) \
                == sorted(sims)
            best = q(demo, "SELECT explanation FROM labels WHERE source_id = ? AND feature_id = ?", [source, fid])[0][0]
            assert res.scored_explanations[0].explanation == best
            for e in res.scored_explanations:
                seqs = e.scored_simulation.scored_sequence_simulations
                assert seqs and all(isinstance(s, ScoredSequenceSimulation) for s in seqs)
                true = [a for s in seqs for a in s.true_activations]
                pred = [a for s in seqs for a in s.simulation.expected_activations]
                assert all(len(s.simulation.tokens) == len(s.true_activations) for s in seqs)
                # the stored score is the correlation over all windows concatenated
                n = len(true)
                mt, mp = sum(true) / n, sum(pred) / n
                r = sum((a - mt) * (b - mp) for a, b in zip(true, pred)) / math.sqrt(
                    sum((a - mt) ** 2 for a in true) * sum((b - mp) ** 2 for b in pred))
                assert r == pytest.approx(e.scored_simulation.ev_correlation_score, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# delphi


def test_delphi_files(demo, exported):
    root = exported["delphi"]
    modules = {"6-mlp": "layers.6.mlp", "6-res-sae16": "layers.6"}
    for source, module in modules.items():
        run = root / source
        assert json.loads((run / "run_config.json").read_text())["hookpoints"] == [module]
        labels = dict(q(demo, "SELECT feature_id, explanation FROM labels WHERE source_id = ?", [source]))
        files = sorted((run / "explanations").iterdir())
        assert {int(p.stem.split("latent")[-1]) for p in files} == set(labels)
        for p in files:
            assert p.name.startswith(f"{module}_latent")
            assert json.loads(p.read_text()) == labels[int(p.stem.split("latent")[-1])]
        assert sorted(p.name for p in (run / "scores").iterdir()) == ["detection", "fuzz", "simulation"]
        for scorer_dir, scorer in (("detection", "detection"), ("fuzz", "fuzzing")):
            for p in (run / "scores" / scorer_dir).glob(f"*{module}*"):
                latent = int(p.stem.split("latent")[-1])  # as delphi's result analysis reads it
                data = json.loads(p.read_bytes())
                assert data and all(list(ex) == ["str_tokens", "activations", "distance", "activating",
                                                 "prediction", "probability", "correct"] for ex in data)
                assert all(len(ex["str_tokens"]) == len(ex["activations"]) > 0 for ex in data)
                pos = [ex for ex in data if ex["activating"]]
                neg = [ex for ex in data if not ex["activating"]]
                bal = ((sum(ex["correct"] for ex in pos) / len(pos) if pos else 0)
                       + (sum(ex["correct"] for ex in neg) / len(neg) if neg else 0)) / 2
                stored = q(demo, """SELECT s.value FROM labels l JOIN scores s USING (explanation_id)
                                    WHERE l.source_id = ? AND l.feature_id = ? AND s.scorer = ?""",
                           [source, latent, scorer])[0][0]
                assert bal == pytest.approx(stored)
        for p in (run / "scores" / "simulation").iterdir():
            latent = int(p.stem.split("latent")[-1])
            data = json.loads(p.read_text())
            stored = q(demo, """SELECT s.value FROM labels l JOIN scores s USING (explanation_id)
                                WHERE l.source_id = ? AND l.feature_id = ? AND s.scorer = 'simulation'
                                AND s.split = 'test'""", [source, latent])[0][0]
            assert data[0]["distance"] == 0 and data[0]["ev_correlation_score"] == pytest.approx(stored)
            assert data[0]["scored_sequence_simulations"]
        _check_firing_counts(demo, run, source, module)


def _check_firing_counts(demo, run: Path, source: str, module: str) -> None:
    """delphi's result analysis (log_results, frequency-weighted F1) reads log/hookpoint_firing_counts.pt
    with torch.load(weights_only=True): each latent's firing count, by hookpoint."""
    import torch

    counts = torch.load(run / "log" / "hookpoint_firing_counts.pt", weights_only=True)
    assert list(counts) == [module] and counts[module].dtype == torch.int64
    width = q(demo, "SELECT width FROM sources WHERE source_id = ?", [source])[0][0]
    expected = [0] * width
    for feature_id, n in q(demo, "SELECT feature_id, n_active FROM features WHERE source_id = ?", [source]):
        expected[feature_id] = n
    assert counts[module].tolist() == expected and sum(expected) > 0


def test_delphi_distance_counts_quantiles_from_the_strongest():
    """delphi's samplers (delphi/latents/samplers.py, split_quantiles) number quantiles from the
    strongest examples, 0 first, and its scorers write -1 for non-activating ones; our bins count
    from the weakest (1), after the top windows."""
    from featurescribe.export.delphi import _distance

    assert _distance("top", None, 4) == 0
    assert [_distance("quantile", q, 4) for q in (4, 3, 2, 1)] == [1, 2, 3, 4]
    assert _distance("quantile", 3, 0) == 1  # bins above the 3rd unseen: still the strongest here
    assert _distance("random", None, 4) == -1


# ---------------------------------------------------------------------------------------------
# Parquet and JSON


def test_parquet_every_table_readable_by_pyarrow_and_duckdb(demo, exported):
    root = exported["parquet"]
    tables = [r[0] for r in q(demo, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")
              if r[0] not in STORAGE_TABLES]  # the rows under the activations view: exported through it
    assert {"sources", "sequences", "activations", "features", "explanations", "scores", "examples",
            "simulations", "llm_calls", "runs", "labels"} <= set(tables)
    for t in tables:
        path = root / f"{t}.parquet"
        n = q(demo, f'SELECT count(*) FROM "{t}"')[0][0]
        assert pq.read_table(path).num_rows == n
        assert duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchone()[0] == n
    # same rows as the database, column for column
    con = duckdb.connect(demo, read_only=True)
    try:
        for t in ("features", "activations", "scores", "labels"):
            diff = con.execute(f"""SELECT count(*) FROM (
                (SELECT * FROM "{t}" EXCEPT ALL SELECT * FROM read_parquet('{root / t}.parquet'))
                UNION ALL
                (SELECT * FROM read_parquet('{root / t}.parquet') EXCEPT ALL SELECT * FROM "{t}"))""").fetchone()[0]
            assert diff == 0, t
    finally:
        con.close()
    assert pq.read_table(root / "sequences.parquet").column("tokens").type.value_type == "string"


def test_parquet_one_source(demo, tmp_path):
    out = tmp_path / "p"
    assert main(["export", "--db", demo, "--format", "parquet", "--out", str(out), "--source", "6-res-sae16"]) == 0
    assert set(pq.read_table(out / "features.parquet").column("source_id").to_pylist()) == {"6-res-sae16"}
    n = q(demo, """SELECT count(*) FROM scores WHERE explanation_id IN
                   (SELECT explanation_id FROM explanations WHERE source_id = '6-res-sae16')""")[0][0]
    assert pq.read_table(out / "scores.parquet").num_rows == n


def test_json_feature_dictionary(demo, exported):
    doc = json.loads((exported["json"] / "feature_dictionary.json").read_text())
    assert doc["format"] == "featurescribe.feature_dictionary" and doc["version"] == 1
    assert [s["source_id"] for s in doc["sources"]] == ["6-mlp", "6-res-sae16"]
    feats = doc["features"]
    assert [(f["source_id"], f["feature_id"]) for f in feats] == [
        tuple(r) for r in q(demo, "SELECT source_id, feature_id FROM features ORDER BY 1, 2")]
    labels = {(r[0], r[1]): r[2:] for r in q(demo, "SELECT source_id, feature_id, explanation, score, lift FROM labels")}
    stats = {(r[0], r[1]): r[2:] for r in q(demo, "SELECT source_id, feature_id, n_active, frac_active, max_act FROM features")}
    for f in feats:
        key = (f["source_id"], f["feature_id"])
        assert (f["stats"]["n_active"], f["stats"]["frac_active"]) == stats[key][:2]
        assert f["stats"]["max_act"] == pytest.approx(stats[key][2]) if stats[key][2] is not None else f["stats"]["max_act"] is None
        if key in labels:
            text, score, lift = labels[key]
            b = f["best_explanation"]
            assert (b["text"], b["score"]) == (text, score) and b["lift"] == pytest.approx(lift)
        else:
            assert f["best_explanation"] is None
        n_top = q(demo, "SELECT count(*) FROM examples WHERE source_id = ? AND feature_id = ? AND kind = 'top'", list(key))[0][0]
        assert len(f["top_examples"]) == n_top
        for w in f["top_examples"]:
            end = w["start_pos"] + len(w["tokens"])
            assert close(w["acts"], window_acts(demo, *key, w["seq_id"], w["start_pos"], end))
        n_expl = q(demo, "SELECT count(*) FROM explanations WHERE source_id = ? AND feature_id = ?", list(key))[0][0]
        assert len(f["explanations"]) == n_expl
        assert all("scores" in e for e in f["explanations"])


# ---------------------------------------------------------------------------------------------
# the same bytes twice; errors leave nothing behind


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_twice_gives_identical_bytes(demo, exported, tmp_path, fmt):
    again = tmp_path / "again"
    assert main(["export", "--db", demo, "--format", fmt, "--out", str(again)]) == 0
    first = tree(exported[fmt])
    assert first and tree(again) == first
    # exporting over an earlier export replaces it whole, with the same bytes
    (again / "stray.txt").write_text("x")
    assert main(["export", "--db", demo, "--format", fmt, "--out", str(again)]) == 0
    assert tree(again) == first


def _one_error_line(capsys) -> str:
    """The one error line (progress lines aside), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("featurescribe: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_source_is_one_line_and_writes_nothing(demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--db", demo, "--format", "json", "--out", str(out), "--source", "9-nope"]) != 0
    line = _one_error_line(capsys)
    assert "unknown source '9-nope'" in line and "6-mlp" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["report", "--db", demo, "--out", str(tmp_path / "r.html"), "--source", "9-nope"]) != 0
    assert "unknown source" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_empty_database_is_one_line(tmp_path, capsys):
    db = str(tmp_path / "empty.duckdb")
    assert main(["init", "--db", db]) == 0
    capsys.readouterr()
    for fmt in FORMATS:
        assert main(["export", "--db", db, "--format", fmt, "--out", str(tmp_path / "o")]) != 0
        assert "no sources" in _one_error_line(capsys)
    assert main(["report", "--db", db, "--out", str(tmp_path / "r.html")]) != 0
    assert "no sources" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.duckdb"]
    assert main(["export", "--db", str(tmp_path / "missing.duckdb"), "--format", "json", "--out", str(tmp_path / "o")]) != 0
    assert "no database" in _one_error_line(capsys)


def test_unwritable_output_is_one_line(demo, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["export", "--db", demo, "--format", "neuronpedia", "--out", str(blocker / "np")]) != 0
    assert "cannot write" in _one_error_line(capsys)
    assert main(["export", "--db", demo, "--format", "json", "--out", str(blocker)]) != 0
    assert "is a file" in _one_error_line(capsys)
    assert main(["report", "--db", demo, "--out", str(blocker / "r.html")]) != 0
    assert "cannot write" in _one_error_line(capsys)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", "--db", demo, "--format", "json", "--out", str(foreign)]) != 0
    assert "not empty" in _one_error_line(capsys)
    assert (foreign / "notes.txt").read_text() == "keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        try:
            assert main(["export", "--db", demo, "--format", "json", "--out", str(locked / "o")]) != 0
            assert "cannot write" in _one_error_line(capsys)
        finally:
            locked.chmod(0o755)
    expected = {"a-file", "mine"} | ({"locked"} if os.geteuid() != 0 else set())
    assert {p.name for p in tmp_path.iterdir()} == expected  # no half-written folders or files


def test_a_mount_point_is_refused_before_any_work(demo, tmp_path, capsys):
    with tmpfs(tmp_path / "mnt", "ro,size=1m") as mnt:
        assert main(["export", "--db", demo, "--format", "json", "--out", str(mnt)]) == 2
        assert _one_error_line(capsys) == (f"featurescribe: error: cannot export to {mnt}: it is a mount point, "
                                           f"which an export cannot replace; export to a folder inside it, "
                                           f"e.g. --out {mnt / 'export'}")
    assert [p.name for p in tmp_path.iterdir()] == ["mnt"] and list(mnt.iterdir()) == []


def test_failure_midway_leaves_nothing(demo, tmp_path, monkeypatch, capsys):
    from featurescribe.export import neuronpedia as np_mod

    calls = {"n": 0}
    real = np_mod._feature_row

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(np_mod, "_feature_row", boom)
    out = tmp_path / "np"
    assert main(["export", "--db", demo, "--format", "neuronpedia", "--out", str(out)]) == 1  # not bad input
    assert _one_error_line(capsys) == (f"featurescribe: error: cannot write to {out}: the disk is full; nothing "
                                       "was written: free some space and run the same command again")
    assert list(tmp_path.iterdir()) == []


def test_a_source_whose_harvest_was_interrupted_is_not_exported_or_labelled(smollm2, tmp_path, monkeypatch, capsys):
    """A Ctrl-C'd harvest keeps its entries, but a source's statistics (`features`) are written at the
    end: export and report of it used to write 0 features and exit 0."""
    import signal

    from featurescribe.harvest import harvester
    from featurescribe.harvest.harvester import HarvestConfig, harvest
    from featurescribe.interrupts import Interrupted

    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog; def f(x): return x + 1\n" * 40)
    db = str(tmp_path / "h.duckdb")
    cfg = HarvestConfig(db=db, model="smollm2-135m", layer=2, corpus=str(corpus), ctx=16, max_tokens=160,
                        batch_size=2, threshold=0.2, progress=False)
    batches = iter(range(100))

    def ctrl_c_at_the_third_batch():  # the harvest loop's own check, as a signal makes it raise
        if next(batches) == 2:
            raise Interrupted(signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(harvester, "stop_if_received", ctrl_c_at_the_third_batch)
        with pytest.raises(Interrupted):
            harvest(cfg, loaded=smollm2)
    con = open_db(db, read_only=True)
    assert con.execute("SELECT count(*) FROM activations").fetchone()[0] > 0  # what ran is kept
    con.close()
    out = tmp_path / "out"
    assert main(["export", "--db", db, "--format", "json", "--out", str(out)]) == 2
    assert "source 2-mlp" in _one_error_line(capsys) and not out.exists()
    assert main(["report", "--db", db, "--out", str(tmp_path / "r.html")]) == 2
    assert "not fully harvested" in _one_error_line(capsys) and not (tmp_path / "r.html").exists()
    assert main(["label", "--db", db, "--source", "2-mlp", "--features", "0:4", "--explainer", "baseline:tokens",
                 "--simulator", "lexical", "--no-progress"]) == 2
    assert _one_error_line(capsys) == (
        "featurescribe: error: source 2-mlp is not fully harvested (its harvest was interrupted or is still "
        "running): run the same harvest command again to finish it first")
    harvest(cfg, loaded=smollm2)  # the same harvest again finishes it
    assert main(["export", "--db", db, "--format", "json", "--out", str(out)]) == 0
    assert "exported 1536 features" in capsys.readouterr().out


def test_oai_random_sample_by_quantile_is_indexed_by_bin():
    """openai/automated-interpretability's neuron-viewer (src/panes/datasetList.jsx) reads
    `random_sample_by_quantile[0]` to `[3]` as the quantile ranges from the lowest up, beside
    `quantile_boundaries`: list i must be bin i+1 (the sampler's bin 1 is the weakest), with an
    empty list for a bin that has no window, not the non-empty bins packed together."""
    from featurescribe.export.oai import neuron_record
    from featurescribe.store.export_queries import FeatureBundle

    def window(kind, quantile, seq_id):
        return {"kind": kind, "quantile": quantile, "seq_id": seq_id, "tokens": ["a", "b"], "acts": [0.0, 1.0]}

    b = FeatureBundle(source_id="6-mlp", feature_id=3, stats={},
                      examples=[window("top", None, 1), window("quantile", 3, 7), window("quantile", 1, 8)],
                      moments={"quantile_boundaries": [0.5, 1.0, 1.5]})
    by_q = neuron_record(b, 6)["random_sample_by_quantile"]
    assert len(by_q) == 4
    assert [len(x) for x in by_q] == [1, 0, 1, 0]
