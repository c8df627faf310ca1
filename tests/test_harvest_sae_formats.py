"""sparsify checkpoints, SAELens transcoders and Gemma Scope folders harvested on the real offline
SmolLM2-135M: the stored latents equal latents computed by hand from activations this test captures
with its own hooks on the model; a checkpoint that does not fit its hook is one line before any work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from featurescribe.cli import main
from tests.sae_checkpoints import (sparsify_latents, transcoder_latents, write_saelens_transcoder,
                                   write_sparsify)
from tests.test_harvest import LAYER, assert_matches, cli_error, corpus_file, read, run  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow
D_MODEL, LATENTS, K = 576, 96, 6


def captured(model, where: str, token_ids) -> torch.Tensor:
    """[T, width] for one sequence at `where`: 'resid' (hidden_states after layer LAYER),
    'next_layer_in' (the input of decoder layer LAYER + 1), 'mlp_in' / 'mlp_out' (the input / output
    of layer LAYER's MLP module)."""
    ids = torch.tensor([token_ids])
    if where == "resid":
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
    box = {}
    if where == "next_layer_in":
        module, io = model.model.layers[LAYER + 1], "input"
    else:
        module, io = model.model.layers[LAYER].mlp, "input" if where == "mlp_in" else "output"
    if io == "input":
        handle = module.register_forward_pre_hook(lambda m, args: box.setdefault("x", args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: box.setdefault("x", out))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return box["x"][0]


def harvested(db_path, smollm2, corpus, folder, want_id, want_site, want_hook):
    r = run(db_path, smollm2, corpus, sae=str(folder))
    assert (r.source_id, r.kind, r.width, r.threshold, r.site) == (want_id, "sae", LATENTS, 0, want_site)
    acts, seqs, _, src = read(db_path, r.source_id)
    assert src["hook_name"] == want_hook and src["layer"] == LAYER and src["kind"] == "sae"
    return acts, seqs


@pytest.mark.parametrize("hookpoint, where, activation, set_name", [
    (f"layers.{LAYER}", "resid", "topk", "res"),
    (f"layers.{LAYER}.mlp", "mlp_out", "topk", "mlpout"),
    (f"layers.{LAYER}.mlp", "mlp_out", "groupmax", "mlpout"),
])
def test_sparsify_sae_latents_equal_hand_computation(smollm2, db_path, corpus_file, tmp_path,  # noqa: F811
                                                     hookpoint, where, activation, set_name):
    _, model, _ = smollm2
    run_dir = tmp_path / "sparsify-run"
    w = write_sparsify(run_dir / hookpoint, D_MODEL, LATENTS, K, activation=activation, scale=0.5)
    hook = {"resid": f"model.layers.{LAYER}.output", "mlp_out": f"model.layers.{LAYER}.mlp.output"}[where]
    # the run's folder holds one hookpoint: passing the run folder is the same as passing the hookpoint's
    acts, seqs = harvested(db_path, smollm2, corpus_file, run_dir, f"{LAYER}-{set_name}-sae{LATENTS}", where, hook)
    n = assert_matches(acts, seqs, lambda ids: sparsify_latents(w, captured(model, where, ids), K,
                                                                activation=activation), 0.0, tol=2e-4)
    assert n == len(acts["act"]) > 0


@pytest.mark.parametrize("hookpoint, where, site, hook", [
    (f"layers.{LAYER}.mlp", "mlp_in", "mlp_in", f"model.layers.{LAYER}.mlp.input"),
    (f"layers.{LAYER + 1}", "next_layer_in", "resid", f"model.layers.{LAYER}.output"),
])
def test_sparsify_transcoder_reads_the_module_input(smollm2, db_path, corpus_file, tmp_path,  # noqa: F811
                                                    hookpoint, where, site, hook):
    _, model, _ = smollm2
    w = write_sparsify(tmp_path / hookpoint, D_MODEL, LATENTS, K, transcode=True, scale=0.5)
    set_name = {"mlp_in": "mlpin", "resid": "res"}[site]
    acts, seqs = harvested(db_path, smollm2, corpus_file, tmp_path / hookpoint, f"{LAYER}-{set_name}-sae{LATENTS}",
                           site, hook)
    n = assert_matches(acts, seqs, lambda ids: sparsify_latents(w, captured(model, where, ids), K, transcode=True),
                       0.0, tol=2e-4)
    assert n == len(acts["act"]) > 0


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder"])
def test_saelens_transcoder_latents_equal_hand_computation(smollm2, db_path, corpus_file, tmp_path,  # noqa: F811
                                                           arch):
    _, model, _ = smollm2
    w = write_saelens_transcoder(tmp_path / "tc", D_MODEL, LATENTS, D_MODEL, arch=arch, scale=0.3,
                                 hook_name=f"blocks.{LAYER}.ln2.hook_normalized",
                                 hook_name_out=f"blocks.{LAYER}.hook_mlp_out")
    acts, seqs = harvested(db_path, smollm2, corpus_file, tmp_path / "tc", f"{LAYER}-mlpin-sae{LATENTS}", "mlp_in",
                           f"model.layers.{LAYER}.mlp.input")
    n = assert_matches(acts, seqs, lambda ids: transcoder_latents(w, arch, captured(model, "mlp_in", ids)),
                       0.0, tol=2e-4)
    assert n == len(acts["act"]) > 0


def test_mlp_in_neurons_equal_the_mlp_input(smollm2, db_path, corpus_file):  # noqa: F811
    _, model, _ = smollm2
    r = run(db_path, smollm2, corpus_file, site="mlp_in", threshold=1.0)
    assert (r.source_id, r.width, r.kind) == (f"{LAYER}-mlpin", D_MODEL, "neuron")
    acts, seqs, _, src = read(db_path, r.source_id)
    assert src["hook_name"] == f"model.layers.{LAYER}.mlp.input"
    n = assert_matches(acts, seqs, lambda ids: captured(model, "mlp_in", ids), 1.0)
    assert n == len(acts["act"]) > 0


def harvest_argv(db_path, corpus, sae_dir, *extra):
    return ["harvest", "--db", db_path, "--model", "smollm2-135m", "--layer", str(LAYER), "--sae", str(sae_dir),
            "--corpus", corpus, "--ctx", "16", "--max-tokens", "32", "--no-progress", *extra]


def test_sparsify_d_in_that_does_not_fit_its_hook(smollm2, db_path, corpus_file, tmp_path, capsys):  # noqa: F811
    # a transcoder at layers.L.mlp reads the MLP's input (576 wide), not its hidden neurons (1536)
    write_sparsify(tmp_path / f"layers.{LAYER}.mlp", 1536, LATENTS, K, transcode=True)
    err = cli_error(harvest_argv(db_path, corpus_file, tmp_path / f"layers.{LAYER}.mlp"), capsys)
    assert "width mismatch" in err and "d_in=1536" in err and "576" in err and "mlp_in" in err
    assert not os.path.exists(db_path)


def test_saelens_transcoder_d_in_that_does_not_fit(smollm2, db_path, corpus_file, tmp_path, capsys):  # noqa: F811
    write_saelens_transcoder(tmp_path / "tc", 1536, LATENTS, D_MODEL, hook_name=f"blocks.{LAYER}.ln2.hook_normalized")
    err = cli_error(harvest_argv(db_path, corpus_file, tmp_path / "tc"), capsys)
    assert "width mismatch" in err and "d_in=1536" in err
    assert not os.path.exists(db_path)


def test_saelens_normalization_we_cannot_compute_is_bad_input(smollm2, db_path, corpus_file, tmp_path,  # noqa: F811
                                                               capsys):
    write_saelens_transcoder(tmp_path / "tc", D_MODEL, LATENTS, D_MODEL, hook_name=f"blocks.{LAYER}.mlp.hook_in")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    assert main(harvest_argv(db_path, corpus_file, tmp_path / "tc")) == 2
    err = capsys.readouterr().err
    assert err.startswith("featurescribe: error: ") and len(err.strip().splitlines()) == 1
    assert "expected_average_only_in" in err and not os.path.exists(db_path)


def test_bad_sparsify_folders_write_nothing(smollm2, db_path, corpus_file, tmp_path, capsys):  # noqa: F811
    write_sparsify(tmp_path / "embed" / "layers.0", D_MODEL, LATENTS, K, transcode=True)
    err = cli_error(harvest_argv(db_path, corpus_file, tmp_path / "embed", "--layer", "0"), capsys)
    assert "token embeddings before layer 0" in err
    for hp in (f"layers.{LAYER}", f"layers.{LAYER}.mlp"):
        write_sparsify(tmp_path / "run" / hp, D_MODEL, LATENTS, K)
    err = cli_error(harvest_argv(db_path, corpus_file, tmp_path / "run", "--layer", "0"), capsys)
    assert f"(layer {LAYER}), not on layer 0" in err
    assert not os.path.exists(db_path)


def test_gemma_scope_folder_through_the_command(smollm2, db_path, corpus_file, tmp_path, capsys):  # noqa: F811
    """A params.npz folder: without --site one line and nothing written; with --layer and --site the
    stored latents equal JumpReLU computed with numpy on the residual stream this test captures."""
    from tests.test_sae_gemmascope import jumprelu, write_gemmascope

    _, model, _ = smollm2
    folder = tmp_path / f"layer_{LAYER}" / "width_16k" / "average_l0_20"
    w = write_gemmascope(folder, D_MODEL, LATENTS, threshold=np.full(LATENTS, 0.3, np.float32))
    err = cli_error(harvest_argv(db_path, corpus_file, folder), capsys)
    assert f"names no hook (its folder is layer_{LAYER}): give --layer and --site" in err
    assert not os.path.exists(db_path)
    assert main(harvest_argv(db_path, corpus_file, folder, "--site", "resid")) == 0
    capsys.readouterr()
    acts, seqs, _, src = read(db_path, f"{LAYER}-res-sae{LATENTS}")
    assert src["hook_name"] == f"model.layers.{LAYER}.output" and src["kind"] == "sae"
    n = assert_matches(acts, seqs, lambda ids: torch.from_numpy(jumprelu(w, captured(model, "resid", ids).numpy())),
                       0.0, tol=2e-4)
    assert n == len(acts["act"]) > 0
