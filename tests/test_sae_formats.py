"""sparsify checkpoints and SAELens transcoders: detection from the files, encoding against the
formulas written out by hand, the folders a `--sae` argument stands for, and bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.sae import load_sae, resolve_sae_site, sae_dirs, site_of_hook
from tests.sae_checkpoints import (sparsify_latents, transcoder_latents, write_saelens_transcoder,
                                   write_sparsify)

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("activation", ["topk", "groupmax"])
@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_encode_matches_formula(tmp_path, activation, transcode):
    w = write_sparsify(tmp_path / "layers.3", 16, 48, 6, transcode=transcode, activation=activation)
    sae = load_sae(tmp_path / "layers.3")
    assert (sae.cfg.format, sae.cfg.transcoder, sae.cfg.architecture) == ("sparsify", transcode, activation)
    assert (sae.cfg.d_in, sae.width, sae.cfg.k) == (16, 48, 6)
    assert sae.cfg.hook_name == ("layers.3.input" if transcode else "layers.3")
    got = sae.encode(X)
    torch.testing.assert_close(got, sparsify_latents(w, X, 6, transcode=transcode, activation=activation))
    assert int((got != 0).sum(-1).max()) <= 6 and (got > 0).any()
    # the b_dec rule matters: the other choice gives other latents
    assert not torch.allclose(got, sparsify_latents(w, X, 6, transcode=not transcode, activation=activation))


def test_sparsify_groupmax_keeps_one_per_group(tmp_path):
    write_sparsify(tmp_path / "layers.1", 16, 48, 6, activation="groupmax", scale=5.0)
    got = load_sae(tmp_path / "layers.1").encode(X).reshape(-1, 6, 8)
    assert int((got != 0).sum(-1).max()) <= 1


def test_sparsify_num_latents_zero_means_expansion_factor(tmp_path):
    write_sparsify(tmp_path / "layers.2", 4, 128, 3, num_latents_field=0)  # 32 * d_in = 128
    assert load_sae(tmp_path / "layers.2").width == 128


def test_sparsify_bfloat16_checkpoint(tmp_path):
    w = write_sparsify(tmp_path / "layers.2", 16, 32, 4, dtype=torch.bfloat16)
    sae = load_sae(tmp_path / "layers.2", dtype=torch.float32)
    assert sae.cfg.dtype == "bfloat16" and sae.dtype == torch.float32
    torch.testing.assert_close(sae.encode(X), sparsify_latents(w, X, 4))


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder", "skip_transcoder"])
def test_saelens_transcoder_encode_matches_formula(tmp_path, arch):
    w = write_saelens_transcoder(tmp_path / "tc", 16, 40, 16, arch=arch, hook_name="blocks.2.ln2.hook_normalized",
                                 hook_name_out="blocks.2.hook_mlp_out")
    sae = load_sae(tmp_path / "tc")
    assert sae.cfg.transcoder and sae.cfg.format == "saelens" and not sae.cfg.apply_b_dec_to_input
    assert (sae.cfg.d_out, sae.cfg.hook_name_out) == (16, "blocks.2.hook_mlp_out")
    assert resolve_sae_site(sae) == ("mlp_in", 2)
    got = sae.encode(X)
    torch.testing.assert_close(got, transcoder_latents(w, arch, X))
    assert (got > 0).any()
    assert not torch.allclose(got, transcoder_latents(w, arch, X - w["b_dec"]))
    assert tuple(sae.W_dec.shape) == (40, 16)


def test_saelens_transcoder_to_another_width(tmp_path):
    w = write_saelens_transcoder(tmp_path / "tc", 16, 24, 10, hook_name="blocks.0.mlp.hook_in")
    sae = load_sae(tmp_path / "tc")
    torch.testing.assert_close(sae.encode(X), transcoder_latents(w, "transcoder", X))
    assert tuple(sae.b_dec.shape) == (10,)


def test_hook_names_of_the_new_formats():
    assert site_of_hook("layers.6") == ("resid", 6)
    assert site_of_hook("layers.6.mlp") == ("mlp_out", 6)
    assert site_of_hook("layers.6.self_attn") == ("attn", 6)
    assert site_of_hook("layers.6.mlp.input") == ("mlp_in", 6)
    assert site_of_hook("layers.6.input") == ("resid", 5)
    assert site_of_hook("model.layers.6.mlp.input") == ("mlp_in", 6)
    assert site_of_hook("blocks.6.ln2.hook_normalized") == ("mlp_in", 6)
    assert site_of_hook("blocks.6.mlp.hook_in") == ("mlp_in", 6)
    assert site_of_hook("transformer.h.4.mlp") == ("mlp_out", 4)
    assert site_of_hook("blocks.6.hook_mlp_in") is None  # before the norm: no site reads it
    assert site_of_hook("layers.6.mlp.act_fn") is None


def test_sparsify_transcoder_at_a_whole_layer_reads_the_layer_before(tmp_path):
    write_sparsify(tmp_path / "layers.4", 16, 32, 4, transcode=True)
    assert resolve_sae_site(load_sae(tmp_path / "layers.4")) == ("resid", 3)
    write_sparsify(tmp_path / "layers.0", 16, 32, 4, transcode=True)
    with pytest.raises(FeaturescribeError, match="token embeddings before layer 0"):
        resolve_sae_site(load_sae(tmp_path / "layers.0"))


def test_resolve_checks_layer_and_site(tmp_path):
    write_sparsify(tmp_path / "layers.4.mlp", 16, 32, 4)
    sae = load_sae(tmp_path / "layers.4.mlp")
    assert resolve_sae_site(sae, 4, "mlp_out") == ("mlp_out", 4)
    with pytest.raises(FeaturescribeError, match=r"\(layer 4\), not on layer 5"):
        resolve_sae_site(sae, 5)
    with pytest.raises(FeaturescribeError, match=r"\(site mlp_out\), not on site resid"):
        resolve_sae_site(sae, 4, "resid")


def test_a_parent_folder_stands_for_its_hookpoints(tmp_path):
    run = tmp_path / "run"
    for hp in ("layers.10", "layers.2", "layers.2.mlp"):
        write_sparsify(run / hp, 8, 16, 2)
    write_sparsify(run / "layers.5" / "seed0", 8, 16, 2)
    write_sparsify(run / "layers.5" / "seed1", 8, 16, 2)
    (run / "notes").mkdir()
    names = [d.relative_to(run).as_posix() for d in sae_dirs(run)]
    assert names == ["layers.2", "layers.2.mlp", "layers.5/seed0", "layers.5/seed1", "layers.10"]
    assert sae_dirs(run / "layers.2") == [run / "layers.2"]
    with pytest.raises(FeaturescribeError, match=r"holds 5 SAEs \(layers.2, layers.2.mlp, layers.5/seed0"):
        load_sae(run)
    assert load_sae(run / "layers.5" / "seed1").cfg.hook_name == "layers.5"
    single = tmp_path / "single"
    write_sparsify(single / "layers.7.mlp", 8, 16, 2)
    assert load_sae(single).cfg.hook_name == "layers.7.mlp"


def test_bad_sparsify_checkpoints(tmp_path):
    write_sparsify(tmp_path / "checkpoint", 8, 16, 2)
    with pytest.raises(FeaturescribeError, match="hookpoint 'checkpoint'.*not one harvest can read"):
        load_sae(tmp_path / "checkpoint")
    write_sparsify(tmp_path / "layers.1", 8, 16, 2)
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 9}))
    with pytest.raises(FeaturescribeError, match=r"encoder.weight has shape \(16, 8\), expected .*\[16, 9\]"):
        load_sae(tmp_path / "layers.1")
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "k": 17}))
    with pytest.raises(FeaturescribeError, match="k=17 must be between 1 and num_latents=16"):
        load_sae(tmp_path / "layers.1")
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "k": 3, "activation": "groupmax"}))
    with pytest.raises(FeaturescribeError, match="multiple of k=3"):
        load_sae(tmp_path / "layers.1")
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "activation": "batchtopk"}))
    with pytest.raises(FeaturescribeError, match="activation 'batchtopk' is not supported"):
        load_sae(tmp_path / "layers.1")
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "signed": True}))
    with pytest.raises(FeaturescribeError, match="signed: true .* is not supported"):
        load_sae(tmp_path / "layers.1")
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(16, 8)}, str(tmp_path / "layers.1" / "sae.safetensors"))
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FeaturescribeError, match="sae.safetensors lacks encoder.bias, b_dec"):
        load_sae(tmp_path / "layers.1")
    (tmp_path / "layers.1" / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FeaturescribeError, match="cannot read sae.safetensors"):
        load_sae(tmp_path / "layers.1")


def test_incomplete_folders(tmp_path):
    write_sparsify(tmp_path / "layers.1", 8, 16, 2)
    (tmp_path / "layers.1" / "sae.safetensors").unlink()
    with pytest.raises(FeaturescribeError, match="missing sae_weights.safetensors or sae.safetensors"):
        load_sae(tmp_path / "layers.1")
    (tmp_path / "layers.1" / "cfg.json").write_text("{not json")
    (tmp_path / "layers.1" / "sae.safetensors").write_bytes(b"")
    with pytest.raises(FeaturescribeError, match="cfg.json is not valid JSON"):
        load_sae(tmp_path / "layers.1")


def test_hookpoint_of_a_relative_or_linked_folder(tmp_path, monkeypatch):
    write_sparsify(tmp_path / "run" / "layers.3.mlp", 8, 16, 2)
    monkeypatch.chdir(tmp_path / "run" / "layers.3.mlp")
    assert load_sae(".").cfg.hook_name == "layers.3.mlp"
    (tmp_path / "layers.5").symlink_to(tmp_path / "run" / "layers.3.mlp")
    assert load_sae(tmp_path / "layers.5").cfg.hook_name == "layers.5"


def test_saelens_sae_without_a_known_hook_reads_the_site_asked(tmp_path):
    write_saelens_transcoder(tmp_path / "tc", 16, 24, 16, hook_name=None)
    sae = load_sae(tmp_path / "tc")
    assert resolve_sae_site(sae, 2) == ("mlp_in", 2)
    assert resolve_sae_site(sae, 2, "resid") == ("resid", 2)
    with pytest.raises(FeaturescribeError, match="its config names no hook: give --layer and --site"):
        resolve_sae_site(sae)


@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_mid", "blocks.2.hook_mlp_in", "blocks.2.attn.hook_z",
                                  "blocks.2.ln1.hook_normalized"])
def test_transformer_lens_hooks_no_site_reads_are_refused(tmp_path, hook):
    """hook_mlp_in is the residual stream before ln2 (mlp_in is after it), hook_resid_mid is not the
    layer's output, ...: reading --site there would encode another tensor than the SAE's."""
    write_saelens_transcoder(tmp_path / "tc", 16, 24, 16, hook_name=hook)
    with pytest.raises(FeaturescribeError, match=f"cannot read its hook '{hook}'.*TransformerLens"):
        resolve_sae_site(load_sae(tmp_path / "tc"), 2, "mlp_in")
