"""Many sources in one harvest: every source gets exactly the rows a harvest of it alone gives, the
forward pass stops after the deepest hooked layer, and bad combinations are refused before any work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from featurescribe.cli import main
from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.harvester import HarvestConfig, harvest_all
from featurescribe.store import open_db
from tests.test_harvest_sae import write_sae

pytestmark = pytest.mark.slow

CTX = 16
TEXT = ("def area(r):\n    return 3.14159 * r * r\n# The circle's area grows with the square of its radius.\n"
        "Tables list 12, 345 and 6789; the list [1, 2, 3] has three items. It was the best of times.\n") * 4
VOLATILE = {"created_at", "params"}


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return str(p)


def run(db, smollm2, corpus, **kw):
    cfg = HarvestConfig(db=db, model="smollm2-135m", corpus=corpus, ctx=CTX, max_tokens=6 * CTX, batch_size=2,
                        progress=False, **kw)
    return harvest_all(cfg, loaded=smollm2)


def rows(db, source_id):
    con = open_db(db, read_only=True)
    try:
        acts = con.execute("SELECT feature_id, seq_id, pos, act FROM activations WHERE source_id = ? "
                           "ORDER BY ALL", [source_id]).fetchall()
        feats = con.execute("SELECT * EXCLUDE (source_id) FROM features WHERE source_id = ? ORDER BY feature_id",
                            [source_id]).fetchall()
        src = con.execute("SELECT * FROM sources WHERE source_id = ?", [source_id]).fetchone()
        cols = [d[0] for d in con.description]
        seqs = con.execute("SELECT seq_id, token_ids, tokens, corpus_index FROM sequences ORDER BY seq_id").fetchall()
        params = json.loads(src[cols.index("params")])
    finally:
        con.close()
    source = {c: v for c, v in zip(cols, src) if c not in VOLATILE}
    return acts, feats, source, seqs, {k: v for k, v in params.items() if k not in ("seconds", "tokens_per_s")}


def test_every_source_equals_its_single_harvest(smollm2, tmp_path, corpus_file):
    w = write_sae(tmp_path / "sae", "topk", 576, 64, hook_name="blocks.3.hook_resid_post", k=5, scale=0.3)
    assert w is not None
    multi = str(tmp_path / "multi.duckdb")
    results = run(multi, smollm2, corpus_file, layer="1,3", site="mlp,resid", sae=[str(tmp_path / "sae")])
    ids = [r.source_id for r in results]
    assert ids == ["1-mlp", "1-res", "3-mlp", "3-res", "3-res-sae64"]
    singles = {"1-mlp": dict(layer=1, site="mlp"), "1-res": dict(layer=1, site="resid"),
               "3-mlp": dict(layer=3, site="mlp"), "3-res": dict(layer=3, site="resid"),
               "3-res-sae64": dict(sae=str(tmp_path / "sae"))}
    for sid, kw in singles.items():
        alone = str(tmp_path / f"alone-{sid}.duckdb")
        (r,) = run(alone, smollm2, corpus_file, **kw)
        want, got = rows(alone, sid), rows(multi, sid)
        assert len(want[0]) > 0
        assert got[0] == want[0], sid  # activations: every row, bit for bit
        assert got[1] == want[1], sid  # features
        assert got[2] == want[2], sid  # sources
        assert got[3] == want[3]  # sequences: stored once, shared by every source
        assert got[4] == want[4], sid
        assert next(x for x in results if x.source_id == sid).n_activations == r.n_activations


def test_forward_stops_after_the_deepest_hooked_layer(smollm2, db_path, corpus_file):
    _, model, _ = smollm2
    calls = {"4": 0, "3": 0}
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, o, k=str(i): calls.__setitem__(k, calls[k] + 1))
             for i in (3, 4)]
    try:
        run(db_path, smollm2, corpus_file, layer="0-3", site="mlp,attn")
    finally:
        for h in hooks:
            h.remove()
    assert calls["4"] == 0
    assert calls["3"] == 0  # layer 3's block never returns: its MLP down projection is the last hook


def test_site_widths_read_from_weights_equal_what_a_forward_pass_shows(smollm2):
    import torch

    from featurescribe.harvest.sites import POST_NORM_SITES, SITES, MultiSiteReader

    _, model, _ = smollm2
    llama_sites = [s for s in SITES if s not in POST_NORM_SITES.values()]  # those are Gemma 2/3's
    keys = [(site, layer) for site in llama_sites for layer in (0, 5)]
    reader = MultiSiteReader(model, keys)  # no probe forward pass: the widths come from the modules
    seen = reader.run(torch.tensor([[1, 2, 3]]))
    assert {k: s.width for k, s in reader.sites.items()} == {k: int(seen[k].shape[-1]) for k in keys}
    assert {s.width for s in reader.sites.values()} == {576, 1536}


def test_cli_prints_a_source_id_line_per_source(smollm2, db_path, corpus_file, capsys):
    rc = main(["harvest", "--db", db_path, "--model", "smollm2-135m", "--layer", "0-2", "--site", "mlp_out",
               "--corpus", corpus_file, "--ctx", str(CTX), "--max-tokens", str(2 * CTX), "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert [x for x in out if x.startswith("source_id: ")] == [f"source_id: {i}-mlpout" for i in range(3)]
    con = open_db(db_path, read_only=True)
    assert con.execute("SELECT count(DISTINCT source_id) FROM features").fetchone()[0] == 3
    assert con.execute("SELECT count(*) FROM sequences").fetchone()[0] == 2
    con.close()


def cli_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("featurescribe: error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_combinations_write_nothing(smollm2, db_path, corpus_file, tmp_path, capsys):
    base = ["harvest", "--db", db_path, "--model", "smollm2-135m", "--corpus", corpus_file, "--no-progress"]
    for name in ("a", "b"):
        write_sae(tmp_path / name, "standard", 576, 64, hook_name="blocks.2.hook_resid_post", seed=ord(name))
    write_sae(tmp_path / "narrow", "standard", 100, 64, hook_name="blocks.2.hook_mlp_out")
    cases = [
        (["--sae", str(tmp_path / "a"), "--sae", str(tmp_path / "b")], "two sources would get the id 2-res-sae64"),
        (["--layer", "2", "--site", "resid,resid"], None),  # a repeated site is one source, not an error
        (["--layer", "3,30"], "layer 30 is out of range"),
        (["--layer", "1-2", "--source-id", "mine"], "--source-id names one source"),
        (["--layer", "2", "--site", "mlp", "--sae", str(tmp_path / "narrow")], "d_in=100"),
        (["--layer", "x-y"], "bad --layer"),
        (["--layer", "2", "--site", "mlp,nope"], "unknown site 'nope'"),
    ]
    for extra, msg in cases:
        if msg is None:
            continue
        err = cli_error(base + extra, capsys)
        assert msg in err, (extra, err)
        assert not os.path.exists(db_path)


def test_source_id_option_for_one_source(smollm2, db_path, corpus_file):
    (r,) = run(db_path, smollm2, corpus_file, layer=2, site="mlp", source_id="mine", threshold=0.3)
    assert r.source_id == "mine"
    with pytest.raises(FeaturescribeError, match="harvest_all|sources"):
        from featurescribe.harvest.harvester import harvest
        harvest(HarvestConfig(db=db_path, model="smollm2-135m", layer="1,2", corpus=corpus_file, ctx=CTX,
                              max_tokens=CTX, progress=False), loaded=smollm2)
    assert np.isfinite(r.threshold)
