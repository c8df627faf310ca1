"""`featurescribe.harvest` with objects already in memory: a loaded transformers model and its
tokenizer, and real SAELens `SAE` objects built offline from SAELens' own config classes with
random weights. The stored latents equal SAELens' own `encode` of activations this test captures
from the model itself."""

from __future__ import annotations

import pytest
import torch

import featurescribe as fs
from tests.sae_checkpoints import saelens_weights
from tests.test_harvest import CTX, LAYER, assert_matches, corpus_file, direct, read  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow
D_MODEL = 576
WIDTHS = {"standard": 96, "topk": 80, "jumprelu": 64}  # a width each: the source ids differ


def _options(corpus: str, **kw) -> dict:
    return dict(corpus=corpus, ctx=CTX, max_tokens=4 * CTX, batch_size=3, no_progress=True, **kw)


def _saelens_sae(kind: str, seed: int):
    """A SAELens SAE of `kind` reading the residual stream after layer LAYER, random weights."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post", model_name="smollm2-135m")
    cls, cfg_cls, extra = {"standard": ("StandardSAE", "StandardSAEConfig", {}),
                           "topk": ("TopKSAE", "TopKSAEConfig", {"k": 6}),
                           "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {})}[kind]
    d_sae = WIDTHS[kind]
    sae = getattr(sae_lens, cls)(getattr(sae_lens, cfg_cls)(d_in=D_MODEL, d_sae=d_sae, metadata=meta, **extra))
    g = torch.Generator().manual_seed(seed)
    state = saelens_weights(g, D_MODEL, d_sae, D_MODEL, scale=0.5, b_dec_scale=0.1)
    if kind == "jumprelu":
        state["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    missing = set(sae.state_dict()) - set(state)
    assert not missing, missing
    sae.load_state_dict(state)
    return sae.eval()


def test_a_loaded_model_and_tokenizer_harvest_like_the_named_model(smollm2, db_path, corpus_file):
    _, model, tokenizer = smollm2
    [r] = fs.harvest(db_path, model=model, tokenizer=tokenizer, model_id="my-smollm2", layer=str(LAYER),
                     site="mlp", threshold="0.5", **_options(corpus_file))
    assert isinstance(r, fs.HarvestResult) and (r.source_id, r.model_id, r.kind) == (f"{LAYER}-mlp", "my-smollm2", "neuron")
    acts, seqs, _, src = read(db_path, r.source_id)
    assert src["model_id"] == "my-smollm2"
    n = assert_matches(acts, seqs, lambda ids: direct(model, "mlp", LAYER, ids), 0.5)
    assert n == len(acts["act"]) > 0


def test_saelens_sae_objects_harvest_what_saelens_encodes(smollm2, db_path, corpus_file):
    _, model, tokenizer = smollm2
    saes = {kind: _saelens_sae(kind, seed) for seed, kind in enumerate(("standard", "topk", "jumprelu"))}
    results = fs.harvest(db_path, model=model, tokenizer=tokenizer, sae=list(saes.values()), source_id=None,
                         **_options(corpus_file))
    assert [(r.kind, r.width) for r in results] == [("sae", w) for w in WIDTHS.values()]
    for r, (kind, sae) in zip(results, saes.items()):
        assert r.source_id == f"{LAYER}-res-sae{WIDTHS[kind]}"
        acts, seqs, _, src = read(db_path, r.source_id)
        assert src["hook_name"] == f"model.layers.{LAYER}.output" and src["layer"] == LAYER

        def saelens_encode(ids, sae=sae):
            with torch.no_grad():
                return sae.encode(direct(model, "resid", LAYER, ids))

        n = assert_matches(acts, seqs, saelens_encode, 0.0, tol=2e-4)
        assert n == len(acts["act"]) > 0, kind


def test_objects_that_do_not_fit_are_one_typed_error(smollm2, db_path, corpus_file):
    _, model, tokenizer = smollm2
    with pytest.raises(fs.BadOption, match="needs its tokenizer"):
        fs.harvest(db_path, model=model, layer="6", **_options(corpus_file))
    with pytest.raises(fs.BadOption, match="not a loaded model"):
        fs.harvest(db_path, model=model, tokenizer=tokenizer, layer="6", shards=2, **_options(corpus_file))
    with pytest.raises(fs.BadOption, match="neither an SAE folder nor a SAELens SAE"):
        fs.harvest(db_path, model=model, tokenizer=tokenizer, sae=[object()], **_options(corpus_file))
    with pytest.raises(fs.BadOption, match="model must be"):
        fs.harvest(db_path, model=42, layer="6", **_options(corpus_file))
    with pytest.raises(fs.BadOption, match="unknown option 'layers'"):
        fs.harvest(db_path, model="smollm2-135m", layers="6")
    assert not __import__("os").path.exists(db_path)  # nothing was written
