"""The first batch runs through the model while the database is set up (harvest/early.py): the rows
are those of a harvest without the early pass, and a resumed harvest gives it up."""

from __future__ import annotations

import time

import pytest

from featurescribe.harvest import early as early_mod
from featurescribe.harvest import harvester as harvester_mod
from featurescribe.harvest.harvester import HarvestConfig, harvest_all
from featurescribe.harvest.sites import MultiSiteReader
from tests.test_harvest_multi import CTX, corpus_file, rows  # noqa: F401 - corpus_file is a fixture
from tests.test_harvest_sae import write_sae

pytestmark = pytest.mark.slow
SOURCES = ["1-mlp", "1-res", "3-mlp", "3-res", "3-res-sae64"]


def run(db, smollm2, corpus, sae, n_seq=6, **kw):
    cfg = HarvestConfig(db=db, model="smollm2-135m", corpus=corpus, ctx=CTX, max_tokens=n_seq * CTX,
                        batch_size=2, progress=False, layer="1,3", site="mlp,resid", sae=[sae], **kw)
    return harvest_all(cfg, loaded=smollm2)


@pytest.fixture
def sae(tmp_path):
    assert write_sae(tmp_path / "sae", "topk", 576, 64, hook_name="blocks.3.hook_resid_post", k=5, scale=0.3)
    return str(tmp_path / "sae")


@pytest.fixture
def taken(monkeypatch):
    """What each batch got from the early pass (None: it ran through the model itself)."""
    got: list = []
    take = early_mod.EarlyBatch.take

    def spy(self, batch):
        got.append(take(self, batch))
        return got[-1]

    monkeypatch.setattr(early_mod.EarlyBatch, "take", spy)
    return got


def same_rows(a: str, b: str) -> None:
    for sid in SOURCES:
        want, got = rows(a, sid), rows(b, sid)
        assert len(want[0]) > 0
        assert got == want, sid  # activations bit for bit, features, sources, sequences, params


def test_the_early_pass_gives_the_rows_of_a_harvest_without_it(smollm2, tmp_path, corpus_file, sae, taken,
                                                               monkeypatch):
    early = str(tmp_path / "early.duckdb")
    assert [r.source_id for r in run(early, smollm2, corpus_file, sae)] == SOURCES
    assert len(taken) == 3 and set(taken[0]) == {(s, l) for l in (1, 3) for s in ("mlp", "resid")}
    assert taken[1:] == [None, None]
    monkeypatch.setattr(early_mod, "EARLY_BYTES", 0)  # too large: no early pass
    taken.clear()
    late = str(tmp_path / "late.duckdb")
    run(late, smollm2, corpus_file, sae)
    assert taken == [None, None, None]
    same_rows(late, early)


def test_a_resumed_harvest_gives_up_the_early_pass(smollm2, tmp_path, corpus_file, sae, taken, monkeypatch):
    gave_up = []
    forward = early_mod.early_forward

    def wait_for_the_plan(h, head, give_up):  # the setup ends first: the pass must not start
        deadline = time.monotonic() + 10
        while not give_up() and time.monotonic() < deadline:
            time.sleep(0.01)
        gave_up.append(give_up())
        return forward(h, head, give_up)

    resumed = str(tmp_path / "resumed.duckdb")
    run(resumed, smollm2, corpus_file, sae, n_seq=2)  # one batch, then the rest
    taken.clear()
    monkeypatch.setattr(harvester_mod, "early_forward", wait_for_the_plan)
    results = run(resumed, smollm2, corpus_file, sae)
    assert gave_up == [True] and taken == [None, None]
    assert [r.new_sequences for r in results] == [4] * 5
    monkeypatch.undo()
    once = str(tmp_path / "once.duckdb")
    run(once, smollm2, corpus_file, sae)
    same_rows(once, resumed)


def test_a_forward_pass_gives_up_at_a_layer_start_and_leaves_no_hook(smollm2):
    import torch

    _, model, _ = smollm2
    reader = MultiSiteReader(model, [("mlp", 5)])
    asked = []

    def stop_if():
        asked.append(1)
        return len(asked) > 2  # layers 0 and 1 run, layer 2 does not

    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.model.layers]
    ran = []
    spies = [model.model.layers[i].register_forward_hook(lambda *a, i=i: ran.append(i)) for i in range(6)]
    try:
        assert reader.run(torch.tensor([[1, 2, 3]]), stop_if=stop_if) is None
        assert ran == [0, 1]
        assert reader.run(torch.tensor([[1, 2, 3]]), stop_if=lambda: False)[("mlp", 5)].shape == (1, 3, 1536)
    finally:
        for h in spies:
            h.remove()
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.model.layers] == hooks_before
