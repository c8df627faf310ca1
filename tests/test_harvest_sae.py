"""SAEs in SAELens' on-disk format: both config layouts, each architecture, against torch formulas."""

from __future__ import annotations

import json

import pytest
import torch

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.sae import load_sae, parse_config, site_of_hook
from tests.sae_checkpoints import saelens_weights


def write_sae(folder, arch: str, d_in: int, d_sae: int, *, style: str = "v6", hook_name: str | None = None,
              k: int = 4, apply_b_dec: bool = True, seed: int = 0, scale: float = 1.0) -> dict:
    """An SAE folder as SAELens writes it; returns its weights (float32)."""
    g = torch.Generator().manual_seed(seed)
    w = saelens_weights(g, d_in, d_sae, d_in, scale=scale, b_dec_scale=0.1)
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    if style == "v6":
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
               "reshape_activations": "none",
               "metadata": {"model_name": "smollm2-135m", "hook_name": hook_name, "sae_lens_version": "6.5.0",
                            "prepend_bos": True, "context_size": 64}}
        if arch == "topk":
            cfg["k"] = k
    else:  # the flat layout of SAELens < 6
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "hook_name": hook_name,
               "hook_layer": 0, "model_name": "smollm2-135m", "apply_b_dec_to_input": apply_b_dec,
               "normalize_activations": False, "finetuning_scaling_factor": False, "context_size": 64,
               "prepend_bos": True, "sae_lens_training_version": "3.13.0"}
        if arch == "topk":
            cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": k})
        else:
            cfg.update(architecture=arch, activation_fn_str="relu")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


def expected_latents(w: dict, arch: str, x: torch.Tensor, k: int = 4, apply_b_dec: bool = True) -> torch.Tensor:
    """SAELens' encode written out with plain torch."""
    x = x.float()
    if apply_b_dec:
        x = x - w["b_dec"]
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.where(pre > w["threshold"], torch.relu(pre), torch.zeros_like(pre))
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


@pytest.mark.parametrize("style", ["v6", "flat"])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_encode_matches_formula(tmp_path, arch, style):
    w = write_sae(tmp_path / "sae", arch, 16, 40, style=style, hook_name="blocks.3.hook_resid_post", k=5)
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.architecture == arch
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 40)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    got = sae.encode(x)
    want = expected_latents(w, arch, x, k=5)
    torch.testing.assert_close(got, want)
    assert (got > 0).any()
    if arch == "topk":
        assert int((got != 0).sum(-1).max()) <= 5


def test_apply_b_dec_to_input_false(tmp_path):
    w = write_sae(tmp_path / "sae", "standard", 8, 12, apply_b_dec=False)
    x = torch.randn(5, 8)
    torch.testing.assert_close(load_sae(tmp_path / "sae").encode(x), expected_latents(w, "standard", x, apply_b_dec=False))


def _set_cfg(folder, **fields) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **fields}))


def _resave(folder, w: dict, dtype) -> dict:
    """The folder's weights saved again in `dtype`; returns them as saved."""
    from safetensors.torch import save_file

    w = {n: t.to(dtype) for n, t in w.items()}
    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


def test_weights_are_cast_to_the_config_dtype(tmp_path):
    """SAELens casts the weights to cfg.dtype at load and the input to it at encode: a bfloat16 file
    that says float32 is encoded in float32 (not in bfloat16, the file's dtype)."""
    w = _resave(tmp_path / "sae", write_sae(tmp_path / "sae", "jumprelu", 16, 40), torch.bfloat16)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    sae = load_sae(tmp_path / "sae")
    assert sae.dtype == torch.float32
    want = expected_latents({n: t.float() for n, t in w.items()}, "jumprelu", x)
    torch.testing.assert_close(sae.encode(x), want)
    assert (want > 0).any()


def test_a_bfloat16_config_encodes_in_bfloat16(tmp_path):
    w = write_sae(tmp_path / "sae", "standard", 16, 40)
    _set_cfg(tmp_path / "sae", dtype="bfloat16")
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    b = {n: t.bfloat16() for n, t in w.items()}
    want = torch.relu((x.bfloat16() - b["b_dec"]) @ b["W_enc"] + b["b_enc"])
    got = load_sae(tmp_path / "sae").encode(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # load_sae(dtype=) replaces the config's dtype, as SAELens' load_from_disk(dtype=) does: the
    # float32 file is read as it is, not through bfloat16
    torch.testing.assert_close(load_sae(tmp_path / "sae", dtype=torch.float32).encode(x), expected_latents(w, "standard", x))
    _set_cfg(tmp_path / "sae", dtype="torch.float16")  # SAELens' .to(dtype) writes this spelling
    assert load_sae(tmp_path / "sae").dtype == torch.float16
    _set_cfg(tmp_path / "sae", dtype="int8")
    with pytest.raises(FeaturescribeError, match="dtype 'int8' is not one SAELens loads"):
        load_sae(tmp_path / "sae")


def test_a_bfloat16_saelens_object_encodes_as_it_does():
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    from featurescribe.harvest.sae_objects import sae_from_object

    cfg = sae_lens.StandardSAEConfig(d_in=16, d_sae=40, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
    obj = sae_lens.StandardSAE(cfg)
    obj.load_state_dict(saelens_weights(torch.Generator().manual_seed(3), 16, 40, 16, scale=1.0, b_dec_scale=0.1))
    obj = obj.to(torch.bfloat16)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = obj.encode(x)
    torch.testing.assert_close(sae_from_object(obj).encode(x), want, rtol=0, atol=0)


def test_topk_rescaled_by_decoder_norm(tmp_path):
    """SAELens 6 TopK with rescale_acts_by_decoder_norm (a training checkpoint, W_dec not unit-norm):
    the k largest of pre * ||W_dec[i]|| are kept, with those values."""
    w = write_sae(tmp_path / "sae", "topk", 16, 40, k=5)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * w["W_dec"].norm(dim=-1)
    vals, idx = pre.topk(5, dim=-1)
    sae = load_sae(tmp_path / "sae")
    torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals)))
    torch.testing.assert_close(sae.decoder_row(3), w["W_dec"][3] / w["W_dec"][3].norm())


def _write_scaler(folder, factor, **more) -> None:
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor, **more}))


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_a_training_checkpoint_scales_its_input_by_activation_scaler(tmp_path, arch):
    """A SAELens checkpoint trained with normalize_activations expected_average_only_in carries its
    factor f in activation_scaler.json: the SAE saw x * f, and its output is divided by f."""
    w = write_sae(tmp_path / "sae", arch, 16, 40)
    _set_cfg(tmp_path / "sae", normalize_activations="expected_average_only_in")
    _write_scaler(tmp_path / "sae", 2.5, has_whitening=False)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    sae = load_sae(tmp_path / "sae")
    got = sae.encode(x)
    torch.testing.assert_close(got, expected_latents(w, arch, x * 2.5))
    assert not torch.allclose(got, expected_latents(w, arch, x))
    # what SAELens' fold_activation_norm_scaling_factor leaves at the end of training encodes the same
    folded = {**w, "W_enc": w["W_enc"] * 2.5, "b_dec": w["b_dec"] / 2.5}
    torch.testing.assert_close(got, expected_latents(folded, arch, x))
    torch.testing.assert_close(sae.decoder_row(3), w["W_dec"][3] / 2.5)


def test_an_activation_scaler_of_null_changes_nothing(tmp_path):
    """Every SAELens checkpoint has the file; without the normalization, or once folded, it holds null."""
    w = write_sae(tmp_path / "sae", "standard", 16, 40)
    _write_scaler(tmp_path / "sae", None)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_sae(tmp_path / "sae").encode(x), expected_latents(w, "standard", x))


@pytest.mark.parametrize("norm, scaler, message", [
    ("none", {"scaling_factor": 2.5}, "holds scaling_factor 2.5 but normalize_activations is 'none'"),
    ("expected_average_only_in", {"scaling_factor": None}, "needs the dataset's norm scaling factor"),
    ("expected_average_only_in", {"scaling_factor": -1}, "scaling_factor must be a positive number or null"),
    ("expected_average_only_in", {"scaling_factor": "2"}, "scaling_factor must be a positive number or null"),
    ("expected_average_only_in", {"scaling_factor": True}, "scaling_factor must be a positive number or null"),
    ("none", {"scaling_factor": None, "has_whitening": True}, "has_whitening .* not supported"),
])
def test_activation_scalers_we_cannot_read_are_refused(tmp_path, norm, scaler, message):
    write_sae(tmp_path / "sae", "standard", 8, 12)
    _set_cfg(tmp_path / "sae", normalize_activations=norm)
    (tmp_path / "sae" / "activation_scaler.json").write_text(json.dumps(scaler))
    with pytest.raises(FeaturescribeError, match=message):
        load_sae(tmp_path / "sae")


def test_a_finetuning_scaling_factor_scales_what_a_latent_decodes_to(tmp_path):
    """SAELens < 6 (finetuning_scaling_factor: true) decoded (acts * scaling_factor) @ W_dec: the latents
    are the same, the direction a latent adds (steering) is scaling_factor[i] * W_dec[i]."""
    w = write_sae(tmp_path / "sae", "standard", 16, 40, style="flat")
    scale = torch.rand(40, generator=torch.Generator().manual_seed(5)) + 0.5
    _resave(tmp_path / "sae", {**w, "scaling_factor": scale}, torch.float32)
    _set_cfg(tmp_path / "sae", finetuning_scaling_factor=True)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    sae = load_sae(tmp_path / "sae")
    torch.testing.assert_close(sae.encode(x), expected_latents(w, "standard", x))
    torch.testing.assert_close(sae.decoder_row(3), w["W_dec"][3] * scale[3])
    _set_cfg(tmp_path / "sae", finetuning_scaling_factor=False)
    with pytest.raises(FeaturescribeError, match="scaling_factor but finetuning_scaling_factor is not true"):
        load_sae(tmp_path / "sae")
    _resave(tmp_path / "sae", {**w, "scaling_factor": torch.ones(40)}, torch.float32)  # all ones: no factor
    torch.testing.assert_close(load_sae(tmp_path / "sae").decoder_row(3), w["W_dec"][3])


@pytest.mark.parametrize("field, value, message", [
    ("normalize_activations", "expected_average_only_in", "needs the dataset's norm scaling factor"),
    ("normalize_activations", True, "needs the dataset's norm scaling factor"),  # SAELens < 6's bool
    ("normalize_activations", "rms_norm", "'rms_norm' is not supported"),
    ("activation_fn_str", "tanh-relu", "activation_fn 'tanh-relu' is not supported"),  # SAELens < 6
])
def test_fields_we_cannot_compute_are_refused(tmp_path, field, value, message):
    """Refused in one line, not encoded as something else (the raw input, or a plain ReLU)."""
    write_sae(tmp_path / "sae", "standard", 8, 12, style="flat" if field == "activation_fn_str" else "v6")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(FeaturescribeError, match=message):
        load_sae(tmp_path / "sae")


def test_config_fields_of_both_layouts():
    v6 = parse_config({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2, "metadata": {"hook_name": "h"}})
    assert (v6.architecture, v6.k, v6.hook_name) == ("topk", 2, "h")
    meta = parse_config({"architecture": "jumprelu", "d_in": 4, "d_sae": 8, "meta": {"hook_name": "m"}})
    assert (meta.architecture, meta.hook_name) == ("jumprelu", "m")
    old = parse_config({"d_in": 4, "d_sae": 8, "hook_point": "blocks.1.hook_mlp_out", "activation_fn_str": "relu"})
    assert (old.architecture, old.hook_name, old.apply_b_dec_to_input) == ("standard", "blocks.1.hook_mlp_out", True)
    with pytest.raises(FeaturescribeError, match="needs k"):
        parse_config({"architecture": "topk", "d_in": 4, "d_sae": 8})
    with pytest.raises(FeaturescribeError, match="not supported"):
        parse_config({"architecture": "matryoshka_mystery", "d_in": 4, "d_sae": 8})
    with pytest.raises(FeaturescribeError, match="d_in and d_sae"):
        parse_config({"architecture": "standard"})


def test_hook_names_map_to_sites():
    assert site_of_hook("blocks.6.hook_resid_post") == ("resid", 6)
    assert site_of_hook("blocks.7.hook_resid_pre") == ("resid", 6)
    assert site_of_hook("blocks.6.mlp.hook_post") == ("mlp", 6)
    assert site_of_hook("blocks.6.hook_mlp_out") == ("mlp_out", 6)
    assert site_of_hook("blocks.6.hook_attn_out") == ("attn", 6)
    assert site_of_hook("model.layers.6.mlp.down_proj.input") == ("mlp", 6)
    assert site_of_hook("model.layers.6.output") == ("resid", 6)
    assert site_of_hook("model.layers.6.post_feedforward_layernorm.output") == ("mlp_out_normed", 6)  # as recorded
    assert site_of_hook("something.else") is None


def test_bad_sae_folders(tmp_path):
    with pytest.raises(FeaturescribeError, match="not a folder"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeaturescribeError, match="missing cfg.json"):
        load_sae(tmp_path / "empty")
    write_sae(tmp_path / "bad", "standard", 8, 12)
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 9, "d_sae": 12}))
    with pytest.raises(FeaturescribeError, match="W_enc has shape"):
        load_sae(tmp_path / "bad")


def _tiny(arch: str):
    """A small random model of the architecture, built from its config (nothing downloaded)."""
    import transformers

    cfg_class, model_class = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                              "llama": ("LlamaConfig", "LlamaForCausalLM")}[arch]
    cfg = getattr(transformers, cfg_class)(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(cfg).eval()


@pytest.mark.parametrize("hook,module", [("blocks.1.hook_mlp_out", "post_feedforward_layernorm"),
                                         ("blocks.1.hook_attn_out", "post_attention_layernorm")])
def test_transformer_lens_sublayer_outputs_of_gemma_are_read_after_its_post_norms(tmp_path, hook, module):
    """TransformerLens takes hook_mlp_out / hook_attn_out of Gemma 2/3 after the norm each sublayer's
    output passes before the residual stream (use_normalization_before_and_after); the raw output
    has the same width, so reading it gave other latents without a word."""
    from featurescribe.harvest.harvester import Harvester

    model = _tiny("gemma2")
    w = write_sae(tmp_path / "sae", "standard", 16, 24, hook_name=hook)
    h = Harvester(model, None, model_id="tiny-gemma2", sae=str(tmp_path / "sae"))
    site = h.reader.sites[h.plans[0].key]
    assert site.hook_name == f"model.layers.1.{module}.output"
    assert h.plans[0].source_id == f"1-{'mlpoutpost' if 'mlp' in hook else 'attpost'}-sae24"
    seen = {}
    handle = getattr(model.model.layers[1], module).register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)
        got = h.reader.run(ids)[h.plans[0].key]
    handle.remove()
    torch.testing.assert_close(got, seen["x"])
    torch.testing.assert_close(h.plans[0].sae.encode(got), expected_latents(w, "standard", seen["x"]))


def test_transformer_lens_sublayer_outputs_of_llama_are_the_sublayers_own(tmp_path):
    """Llama's post_attention_layernorm is its pre-MLP norm: hook_mlp_out stays the MLP's output."""
    from featurescribe.harvest.harvester import Harvester

    write_sae(tmp_path / "sae", "standard", 16, 24, hook_name="blocks.1.hook_mlp_out")
    h = Harvester(_tiny("llama"), None, model_id="tiny-llama", sae=str(tmp_path / "sae"))
    assert h.plans[0].site == "mlp_out" and h.plans[0].source_id == "1-mlpout-sae24"
    assert h.reader.sites[h.plans[0].key].hook_name == "model.layers.1.mlp.output"
