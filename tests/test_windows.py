"""Every alive feature has windows, sampled or not: read from `activations` for features no label
run sampled, in the report and the exports (store/windows.py)."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import pytest

from featurescribe.cli import main
from featurescribe.store import open_db
from featurescribe.store.windows import WindowCounts, feature_windows
from tests.export_fixtures import build_demo_db

SRC, FID = "6-mlp", 7


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("win") / "demo.duckdb")
    build_demo_db(path)
    con = open_db(path)
    con.execute("DELETE FROM examples WHERE source_id = ? AND feature_id = ?", [SRC, FID])
    con.close()
    return path


def acts_of(db: str) -> list[tuple]:
    con = open_db(db, read_only=True)
    try:
        return con.execute("SELECT seq_id, pos, act FROM activations WHERE source_id = ? AND feature_id = ?",
                           [SRC, FID]).fetchall()
    finally:
        con.close()


def check_windows(windows: list[dict], acts: list[tuple]) -> None:
    """Windows hold the stored activations at the right tokens; top windows are the strongest."""
    by_seq: dict[int, dict[int, float]] = {}
    for s, p, a in acts:
        by_seq.setdefault(s, {})[p] = a
    tops = [w for w in windows if w["kind"] == "top"]
    peaks = sorted((max(v.values()) for v in by_seq.values()), reverse=True)
    assert [max(w["acts"]) for w in tops] == pytest.approx(peaks[:len(tops)], rel=1e-5)
    for w in windows:
        assert len(w["tokens"]) == len(w["acts"]) == w["end_pos"] - w["start_pos"]
        want = [by_seq.get(w["seq_id"], {}).get(w["start_pos"] + i, 0.0) for i in range(len(w["acts"]))]
        assert w["acts"] == pytest.approx(want, rel=1e-5)
    kinds = [w["kind"] for w in windows]
    assert kinds == sorted(kinds, key=["top", "quantile", "random"].index)
    assert "random" in kinds and len({(w["seq_id"]) for w in windows if w["kind"] != "random"}) == \
        len([w for w in windows if w["kind"] != "random"])  # one window per active sequence


def test_feature_windows_from_activations(db):
    acts = acts_of(db)
    n_seqs = len({s for s, _, _ in acts})
    ws = feature_windows(open_db(db, read_only=True), SRC, FID, WindowCounts(top=3, per_bin=1, random=4, window=8))
    check_windows(ws, acts)
    assert sum(w["kind"] == "top" for w in ws) == min(3, n_seqs)
    assert sum(w["kind"] == "random" for w in ws) == 4
    assert all(len(w["tokens"]) <= 8 for w in ws)
    # deterministic
    assert ws == feature_windows(open_db(db, read_only=True), SRC, FID, WindowCounts(top=3, per_bin=1, random=4, window=8))


def test_exports_and_report_carry_windows_of_unsampled_features(db, tmp_path):
    acts = acts_of(db)
    assert main(["export", "--db", db, "--format", "json", "--out", str(tmp_path / "j")]) == 0
    feats = json.loads((tmp_path / "j" / "feature_dictionary.json").read_text())["features"]
    f = next(x for x in feats if (x["source_id"], x["feature_id"]) == (SRC, FID))
    windows = [dict(w, kind=k) for k in ("top", "quantile", "random") for w in f[f"{k}_examples"]]
    assert f["top_examples"] and f["random_examples"]
    assert all(w["split"] is None for w in windows)

    assert main(["export", "--db", db, "--format", "oai", "--out", str(tmp_path / "o")]) == 0
    recs = [p for p in (tmp_path / "o").rglob("*.json") if re.search(rf"/{FID}\.json$", str(p)) and SRC in str(p)]
    assert recs, sorted(str(p) for p in (tmp_path / "o").rglob("*"))[:20]
    rec = json.loads(recs[0].read_text())
    top = rec["most_positive_activation_records"]
    assert top and max(top[0]["activations"]) == pytest.approx(max(a for _, _, a in acts), rel=1e-5)
    assert rec["random_sample"] and rec["random_sample_by_quantile"] is not None or len(acts) < 20
    assert rec["mean"] > 0 and rec["variance"] > 0 and len(rec["quantile_boundaries"]) == 3

    assert main(["export", "--db", db, "--format", "neuronpedia", "--out", str(tmp_path / "n")]) == 0
    rows = [json.loads(line) for p in (tmp_path / "n").rglob(f"{SRC}/activations/*.jsonl.gz")
            for line in gzip.open(p, "rt")]
    mine = [r for r in rows if r["index"] == str(FID)]
    assert mine and max(r["maxValue"] for r in mine) == pytest.approx(max(a for _, _, a in acts), rel=1e-5)

    out = tmp_path / "r.html"
    assert main(["report", "--db", db, "--out", str(out)]) == 0
    data = json.loads(re.search(r'<script id="fs-data" type="application/json">(.*?)</script>',
                                out.read_text(), re.S).group(1))
    f = next(x for x in data["features"] if (x["source_id"], x["feature_id"]) == (SRC, FID))
    assert f["top"] and f["random"]
    for w in f["top"]:
        assert max(w["acts"]) > 0
