"""Gemma Scope SAE folders (params.npz, no config), written here in the hub's layout: detection,
latents against JumpReLU computed with numpy, where they read (--layer/--site, on a tiny random
Gemma 2), and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.sae import load_sae, resolve_sae_site, sae_dirs
from tests.test_harvest_sae import _tiny

D_IN, D_SAE = 16, 40


def write_gemmascope(folder, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0, **replace) -> dict:
    """A Gemma Scope SAE folder (params.npz, float32); returns its arrays."""
    rng = np.random.default_rng(seed)
    w = {"W_enc": rng.standard_normal((d_in, d_sae)) / d_in ** 0.5, "W_dec": rng.standard_normal((d_sae, d_in)),
         "b_enc": rng.standard_normal(d_sae) * 0.1, "b_dec": rng.standard_normal(d_in) * 0.5,
         "threshold": rng.uniform(0, 0.4, d_sae)}
    w = {n: a.astype(np.float32) for n, a in {**w, **replace}.items()}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **w)
    return w


def jumprelu(w: dict, x: np.ndarray) -> np.ndarray:
    """Gemma Scope's encoder: b_dec is not subtracted, a latent is kept where pre > threshold."""
    pre = x @ w["W_enc"] + w["b_enc"]
    return np.where(pre > w["threshold"], np.maximum(pre, 0), 0).astype(np.float32)


X = np.random.default_rng(7).standard_normal((3, 5, D_IN)).astype(np.float32)


def test_latents_equal_jumprelu_computed_with_numpy(tmp_path):
    folder = tmp_path / "layer_1" / "width_16k" / "average_l0_71"
    w = write_gemmascope(folder)
    assert sae_dirs(tmp_path / "layer_1" / "width_16k") == [folder]
    sae = load_sae(folder)
    assert (sae.cfg.format, sae.cfg.architecture, sae.cfg.d_in, sae.width) == ("gemmascope", "jumprelu", D_IN, D_SAE)
    assert not sae.cfg.apply_b_dec_to_input and sae.cfg.hook_name is None
    got = sae.encode(torch.from_numpy(X))
    want = jumprelu(w, X)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert 0 < (want > 0).sum() < want.size
    # b_dec subtracted (SAELens' default for its own format) gives other latents
    assert not np.allclose(got.numpy(), jumprelu(w, X - w["b_dec"]), atol=1e-3)
    torch.testing.assert_close(sae.decoder_row(3), torch.from_numpy(w["W_dec"][3]))


def test_a_pre_activation_equal_to_its_threshold_is_not_kept(tmp_path):
    """JumpReLU keeps pre > threshold, strictly (SAELens' JumpReLUSAE, Gemma Scope's own code)."""
    enc = np.random.default_rng(1).standard_normal((D_IN, D_SAE)).astype(np.float32)
    enc[:, 0] = enc[:, 1] = 0  # pre of latents 0 and 1 is b_enc exactly, whatever the input
    b_enc = np.full(D_SAE, -5.0, np.float32)
    b_enc[0], b_enc[1] = 0.25, 0.5
    threshold = np.full(D_SAE, 0.25, np.float32)
    write_gemmascope(tmp_path / "sae", W_enc=enc, b_enc=b_enc, threshold=threshold)
    got = load_sae(tmp_path / "sae").encode(torch.from_numpy(X))
    assert (got[..., 0] == 0).all() and (got[..., 1] == 0.5).all()


def test_it_reads_the_site_and_layer_given(tmp_path):
    write_gemmascope(tmp_path / "layer_1" / "width_16k" / "average_l0_9")
    sae = load_sae(tmp_path / "layer_1" / "width_16k" / "average_l0_9")
    assert resolve_sae_site(sae, 1, "resid") == ("resid", 1)
    assert resolve_sae_site(sae, 1, "mlp_out_normed") == ("mlp_out_normed", 1)
    with pytest.raises(FeaturescribeError, match=r"names no hook \(its folder is layer_1\): give --layer and --site"):
        resolve_sae_site(sae, 1)
    with pytest.raises(FeaturescribeError, match="names no hook"):
        resolve_sae_site(sae, None, "resid")
    with pytest.raises(FeaturescribeError, match=r"its folder is Gemma Scope's layer_1, not layer 2"):
        resolve_sae_site(sae, 2, "resid")
    for site in ("mlp_out", "attn", "attn_normed", "mlp", "mlp_in"):
        with pytest.raises(FeaturescribeError, match=f"not site {site}: a Gemma Scope SAE reads --site resid .*"
                                                     "mlp_out_normed .*attn.hook_z"):
            resolve_sae_site(sae, 1, site)


@pytest.mark.parametrize("site, module", [("mlp_out_normed", "post_feedforward_layernorm"), ("resid", None)])
def test_a_harvester_encodes_the_gemma2_tensor_of_its_site(tmp_path, site, module):
    """On a tiny random Gemma 2: the -mlp SAEs read the MLP output after the post-MLP norm
    (TransformerLens's hook_mlp_out there), the -res ones the layer's output."""
    from featurescribe.harvest.harvester import Harvester

    model = _tiny("gemma2")
    w = write_gemmascope(tmp_path / "layer_1" / "w" / "l0")
    h = Harvester(model, None, model_id="tiny-gemma2", layer="1", site=site, sae=str(tmp_path / "layer_1" / "w" / "l0"))
    [plan] = [p for p in h.plans if p.sae is not None]
    assert (plan.site, plan.layer) == (site, 1)
    seen = {}
    target = getattr(model.model.layers[1], module) if module else model.model.layers[1]
    handle = target.register_forward_hook(lambda m, i, o: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = h.reader.run(ids)[plan.key]
    handle.remove()
    torch.testing.assert_close(got, seen["x"])
    want = jumprelu(w, seen["x"].numpy())
    np.testing.assert_allclose(plan.sae.encode(got).numpy(), want, rtol=1e-5, atol=1e-6)
    assert (want > 0).any()


def test_one_line_refusals(tmp_path):
    from featurescribe.harvest.harvester import Harvester

    write_gemmascope(tmp_path / "att" / "layer_1", d_in=12)  # an -att SAE: n_heads x head_dim wide
    with pytest.raises(FeaturescribeError, match=r"SAE width mismatch: .* d_in=12 .* width 16 \(a Gemma Scope SAE "
                                                 r"reads --site resid .*hook_z.*another Gemma 2 size\)"):
        Harvester(_tiny("gemma2"), None, model_id="tiny-gemma2", layer="1", site="resid",
                  sae=str(tmp_path / "att" / "layer_1"))
    with pytest.raises(FeaturescribeError, match="names no hook; give one --layer and one --site"):
        Harvester(_tiny("gemma2"), None, model_id="tiny-gemma2", sae=str(tmp_path / "att" / "layer_1"))
    write_gemmascope(tmp_path / "embedding" / "width_4k" / "average_l0_6")
    with pytest.raises(FeaturescribeError, match="embedding SAE reads the token embeddings"):
        load_sae(tmp_path / "embedding" / "width_4k" / "average_l0_6")
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), b_enc=np.zeros(8, np.float32))
    with pytest.raises(FeaturescribeError, match="params.npz lacks W_dec, b_dec, threshold"):
        load_sae(tmp_path)
    (tmp_path / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(FeaturescribeError, match="cannot read params.npz"):
        load_sae(tmp_path)
