"""The exporters on a database the pipeline itself made: a real harvest of SmolLM2-135M, labelled
offline (baseline explainer, lexical simulator), then every format and the report."""

from __future__ import annotations

import gzip
import json
import re

import pyarrow.parquet as pq
import pytest

from featurescribe.cli import main
from featurescribe.store import open_db
from featurescribe.store.activation_store import STORAGE_TABLES
from tests.test_export import NP_ACTIVATION_KEYS, NP_EXPLANATION_KEYS, NP_FEATURE_KEYS, NP_SCORE_KEYS
from tests.test_export import NeuronRecord, NeuronSimulationResults, oai_loads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_db(smollm2, tmp_path_factory):
    from featurescribe.harvest.harvester import HarvestConfig, harvest

    db = str(tmp_path_factory.mktemp("pipeline") / "real.duckdb")
    r = harvest(HarvestConfig(db=db, model="smollm2-135m", layer=2, corpus="builtin:stdlib", ctx=64,
                              max_tokens=3000, batch_size=8, progress=False), loaded=smollm2)
    assert main(["label", "--db", db, "--source", r.source_id, "--features", "0:12", "--no-progress"]) == 0
    return db, r.source_id


def test_every_format_and_the_report_on_a_pipeline_database(pipeline_db, tmp_path):
    db, source = pipeline_db
    con = open_db(db, read_only=True, create=False)
    try:
        width = con.execute("SELECT count(*) FROM features WHERE source_id = ?", [source]).fetchone()[0]
        n_labels = con.execute("SELECT count(*) FROM labels WHERE source_id = ?", [source]).fetchone()[0]
        n_tables = len([r for r in con.execute("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_schema = 'main'").fetchall()
                        if r[0] not in STORAGE_TABLES])  # the rows under activations: exported through it
    finally:
        con.close()
    assert width > 0 and n_labels > 0

    out = {}
    for fmt in ("neuronpedia", "oai", "delphi", "parquet", "json"):
        out[fmt] = tmp_path / fmt
        assert main(["export", "--db", db, "--format", fmt, "--out", str(out[fmt])]) == 0

    d = out["neuronpedia"] / "smollm2-135m" / source
    for folder, keys in (("features", NP_FEATURE_KEYS), ("activations", NP_ACTIVATION_KEYS),
                         ("explanations", NP_EXPLANATION_KEYS), ("explanation_scores", NP_SCORE_KEYS)):
        rows = [json.loads(line) for p in sorted((d / folder).glob("batch-*.jsonl.gz")) for line in gzip.open(p, "rt")]
        assert rows and all(list(r) == keys for r in rows), folder
        if folder == "features":
            assert len(rows) == width

    layer_dirs = list((out["oai"] / source / "neurons").iterdir())
    records = [oai_loads(p.read_text(), backwards_compatible=False) for p in layer_dirs[0].iterdir()]
    assert len(records) == width and all(isinstance(r, NeuronRecord) for r in records)
    results = [oai_loads(p.read_text()) for p in (out["oai"] / source / "explanations" / layer_dirs[0].name).iterdir()]
    assert len(results) == n_labels and all(isinstance(r, NeuronSimulationResults) for r in results)

    explanations = list((out["delphi"] / source / "explanations").iterdir())
    assert len(explanations) == n_labels and all(isinstance(json.loads(p.read_text()), str) for p in explanations)

    assert len(list(out["parquet"].glob("*.parquet"))) == n_tables
    assert pq.read_table(out["parquet"] / "features.parquet").num_rows == width
    doc = json.loads((out["json"] / "feature_dictionary.json").read_text())
    assert len(doc["features"]) == width
    assert sum(f["best_explanation"] is not None for f in doc["features"]) == n_labels

    html_path = tmp_path / "report.html"
    assert main(["report", "--db", db, "--out", str(html_path)]) == 0
    html = html_path.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="fs-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert len(data["features"]) == width
