"""label --logit-lens: the tokens a feature's output direction promotes, on the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from featurescribe.harvest.sae import SAE, SAEConfig
from featurescribe.labelers.logit_lens import output_directions, register_model, top_promoted
from tests.test_label import GOOD, _label, _q

pytestmark = pytest.mark.slow

WORDS = [" seven", " blue", "def"]


@pytest.fixture(scope="module")
def lm(smollm2):
    name, model, tokenizer = smollm2
    register_model(name, model, tokenizer)
    return model, tokenizer


def test_a_decoder_row_along_a_tokens_embedding_promotes_that_token(lm):
    """An SAE latent that writes a token's (tied) embedding promotes that token: the decoder row
    goes through the final norm and the unembedding."""
    model, tok = lm
    emb = model.get_output_embeddings().weight.detach()
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in WORDS]
    d_model, d_sae = emb.shape[1], len(WORDS) + 1
    sae = SAE(SAEConfig(d_in=d_model, d_sae=d_sae, architecture="standard", hook_name="blocks.3.hook_resid_post"),
              {"W_enc": torch.zeros(d_model, d_sae), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model),
               "W_dec": torch.cat([emb[ids], -emb[ids[:1]]])})
    promoted = top_promoted(model, tok, output_directions(model, "resid", 3, range(d_sae), sae), k=5)
    for word, top in zip(WORDS, promoted):
        assert word in top
    assert " seven" not in promoted[-1]  # the opposite direction demotes it


def test_mlp_neuron_direction_is_its_down_projection_column(lm):
    model, _ = lm
    down = model.model.layers[2].mlp.down_proj.weight
    d = output_directions(model, "mlp", 2, [5, 9])
    assert d.shape == (2, down.shape[0])
    assert torch.equal(d[1], down[:, 9].float())
    assert torch.equal(output_directions(model, "resid", 2, [4])[0], torch.eye(down.shape[0])[4])


def test_label_with_logit_lens_shows_the_tokens_and_stores_them(labdb, lm, fake_llm):  # noqa: F811
    con_sql = "UPDATE sources SET model_id = 'smollm2-135m', site = 'mlp', layer = 3"
    from featurescribe.store import open_db

    con = open_db(labdb)
    con.execute(con_sql)
    con.close()
    prompts = []

    def responder(req):
        prompts.append(req.user_text)
        return json.dumps({"explanation": GOOD})

    fake_llm.responder = responder
    assert _label(labdb, "--features", "2:4", "--explainer", "openai:gpt-4o-mini", "--logit-lens", "6") == 0
    stored = dict(_q(labdb, "SELECT feature_id, promoted_tokens FROM features WHERE promoted_tokens IS NOT NULL"))
    assert sorted(stored) == [2, 3] and all(len(t) == 6 for t in stored.values())
    model, tok = lm
    assert stored[3] == top_promoted(model, tok, output_directions(model, "mlp", 3, [3]), k=6)[0]
    assert len(prompts) == 2
    for text in prompts:
        line = next(x for x in text.splitlines() if x.startswith("Output side:"))
        assert any(line.endswith(", ".join(json.dumps(t, ensure_ascii=False) for t in toks))
                   for toks in stored.values())
    # without the flag the prompt has no such line
    assert _label(labdb, "--features", "4:5", "--explainer", "openai:gpt-4o-mini") == 0
    assert "Output side:" not in prompts[-1]
