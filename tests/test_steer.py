"""Steering on the real SmolLM2-135M: hooks, generation, KL calibration, output effects, and the
`steer` command (its output, determinism, and one clear line for each kind of bad input)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from featurescribe.cli import main
from featurescribe.steer.hooks import Intervention, apply

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- hooks (no model)
def test_clamp_sets_the_unit_of_steered_rows_only():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = apply(x, Intervention("clamp", 2.0, unit=1), [None, 1.5])
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1, :, 1], torch.full((3,), 3.0))
    assert torch.equal(out[1, :, [0, 2, 3]], x[1, :, [0, 2, 3]])


def test_add_adds_the_scaled_direction_at_every_position():
    x = torch.zeros(3, 2, 4)
    d = torch.tensor([1.0, 0.0, -1.0, 0.5])
    out = apply(x, Intervention("add", 10.0, direction=d), [None, 0.0, 2.0])
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])
    assert torch.equal(out[2], (20.0 * d).expand(2, 4))


def test_an_intervention_needs_its_unit_or_direction():
    from featurescribe.errors import FeaturescribeError

    with pytest.raises(FeaturescribeError):
        Intervention("clamp", 1.0)
    with pytest.raises(FeaturescribeError):
        Intervention("scale", 1.0, unit=0)


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def local(smollm2):
    from featurescribe.llm.backends.local import register_local_model

    name, model, tokenizer = smollm2
    return register_local_model(name, model, tokenizer)


@pytest.fixture(scope="module")
def digits(local):
    """A Steerer at the residual stream after layer 20, and the planted digits direction."""
    from featurescribe.steer.generate import Steerer
    from featurescribe.steer.hooks import hook_point
    from featurescribe.steer.planted import default_output_plants, plant_direction, residual_norm

    steerer = Steerer(local.model, local.tokenizer, hook_point(local.model, "resid", 20))
    plant = default_output_plants()[0]
    assert plant.name == "digits"
    scale = residual_norm(steerer, ["The", "I think that", "She looked at the"])
    return steerer, Intervention("add", scale, direction=plant_direction(local.model, local.tokenizer, plant))


PROMPTS = ["The weather today is", "My favourite thing is", "def main():"]


def test_generation_is_the_same_alone_and_in_a_padded_batch(digits):
    steerer, _ = digits
    batch = steerer.generate(PROMPTS, max_new_tokens=8)
    alone = [steerer.generate([p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batch == alone


def test_sampling_is_deterministic_for_a_seed(digits):
    steerer, iv = digits
    a = steerer.generate(PROMPTS, iv, [None, 0.5, 1.0], max_new_tokens=8, temperature=0.9, seed=3)
    b = steerer.generate(PROMPTS, iv, [None, 0.5, 1.0], max_new_tokens=8, temperature=0.9, seed=3)
    c = steerer.generate(PROMPTS, iv, [None, 0.5, 1.0], max_new_tokens=8, temperature=0.9, seed=4)
    assert a == b and a != c


def test_strength_zero_and_none_leave_the_model_as_it_was(digits):
    steerer, iv = digits
    plain = steerer.next_logprobs(PROMPTS)
    steered = steerer.next_logprobs(PROMPTS, iv, [0.0, None, 0.0])
    assert torch.allclose(plain, steered, atol=1e-5)
    # and the hook is gone afterwards
    assert torch.allclose(steerer.next_logprobs(PROMPTS), plain, atol=1e-6)


def test_pushing_the_digits_direction_writes_digits(digits):
    steerer, iv = digits
    texts = steerer.generate(PROMPTS * 2, iv, [None] * 3 + [1.0] * 3, max_new_tokens=10)
    digit_count = [sum(ch.isdigit() for ch in t) for t in texts]
    assert sum(digit_count[3:]) > sum(digit_count[:3]) + 10


def test_calibration_reaches_the_target_kl_and_kl_grows_with_strength(digits):
    from featurescribe.steer.calibrate import calibrate, mean_kl

    steerer, iv = digits
    kls = mean_kl(steerer, PROMPTS, iv, [0.0, 0.1, 0.3, 1.0])
    assert kls[0] == pytest.approx(0.0, abs=1e-4)
    assert kls[0] < kls[1] < kls[2] < kls[3]
    cal = calibrate(steerer, PROMPTS, iv, target_kl=1.5)
    assert cal.reached and cal.kl == pytest.approx(1.5, rel=0.25)
    assert mean_kl(steerer, PROMPTS, iv, [cal.strength])[0] == pytest.approx(cal.kl, rel=1e-3)


def test_token_changes_of_the_digits_direction_are_digits(digits):
    from featurescribe.steer.effects import token_changes

    steerer, iv = digits
    fx = token_changes(steerer, PROMPTS, iv, 0.5, k=5)
    assert sum(t.strip().isdigit() for t in fx.rising) >= 3
    assert all(d > 0 for d in fx.rising_delta) and all(d < 0 for d in fx.falling_delta)
    assert not set(fx.rising) & set(fx.falling)


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def harvested(tmp_path_factory, local):
    """A real harvest of smollm2-135m layer 3 MLP neurons (a few thousand tokens)."""
    db = str(tmp_path_factory.mktemp("steer") / "h.duckdb")
    assert main(["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "3", "--max-tokens", "2048",
                 "--device", "cpu", "--no-progress"]) == 0
    return db


@pytest.fixture
def hdb(harvested, tmp_path):
    db = str(tmp_path / "copy.duckdb")
    shutil.copy(harvested, db)
    return db


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_steer_prints_both_continuations_side_by_side(hdb, capsys):
    args = ["steer", "--db", hdb, "--source", "3-mlp", "--feature", "5", "--prompt", "The weather today is",
            "--prompt", "def main():", "--strength", "4", "--strength", "20", "--max-new-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.mlp.down_proj.input: clamped to" in out
    head = next(line for line in out.splitlines() if line.startswith("unsteered"))
    assert "| strength 4 (next-token KL" in head and "| strength 20 (next-token KL" in head
    assert out.count("prompt: ") == 2
    assert main(args) == 0
    assert capsys.readouterr().out == out  # the same seed gives the same text


def test_steer_json_with_prompts_from_a_file(hdb, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe best way to\n")
    assert main(["steer", "--db", hdb, "--source", "3-mlp", "--feature", "5", "--prompt-file", str(prompts),
                 "--strength", "40", "--max-new-tokens", "8", "--temperature", "0", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mode"] == "clamp" and res["hook"] == "model.layers.3.mlp.down_proj.input"
    assert [r["prompt"] for r in res["rows"]] == ["Once upon a time", "The best way to"]
    row = res["rows"][0]
    assert row["steered"]["40"] != row["unsteered"]
    assert res["kl"]["40"] > 0.1


@pytest.mark.parametrize("extra,message", [
    (["--feature", "99999"], "feature 99999 is outside source '3-mlp', which has features 0 to 1535"),
    (["--feature", "x"], "--feature must be an integer, not 'x'"),
    (["--feature", "3", "--strength", "strong"], "--strength must be a number, not 'strong'"),
    (["--feature", "3", "--strength", "inf"], "--strength must be a finite number, not 'inf'"),
    (["--feature", "3", "--max-new-tokens", "0"], "--max-new-tokens must be a finite number of at least 1"),
    (["--feature", "3", "--max-new-tokens", "100000000"],  # ran for minutes past the model's context
     "--max-new-tokens 100,000,000 with a prompt of 1 token(s) is longer than the model's context of 8,192 tokens"),
    (["--feature", "3", "--strength", "1e308"],  # finite, but not in float32: a traceback from sampling
     "steering at strength 1e+308 made the model's next-token logits infinite or NaN"),
    (["--feature", "3", "--seed", str(2**64)],  # a traceback from torch's generator
     f"--seed must be a whole number from 0 to 9223372036854775807, not {2**64}"),
    (["--feature", "3", "--prompt", " "], "give at least one non-empty --prompt"),
    (["--feature", "3", "--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file /nonexistent/prompts.txt: no such file"),
    (["--feature", "3", "--prompt-file", "/"], "--prompt-file /: a folder, not a file"),
    (["--feature", "3", "--prompt-file", "{binary}"], "not UTF-8 text (one prompt per line)"),
])
def test_steer_bad_input_is_one_line_and_writes_nothing(hdb, capsys, tmp_path, extra, message):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    extra = [a.replace("{binary}", str(binary)) for a in extra]
    before = _digest(hdb)
    args = ["steer", "--db", hdb, "--source", "3-mlp", "--prompt", "Hello", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert _digest(hdb) == before


def test_steer_a_source_whose_harvest_was_interrupted_is_refused(hdb, smollm2, tmp_path, monkeypatch, capsys):
    """Its `features` rows (the max activations a strength is a multiple of) are written when the
    harvest ends: steer used to go on with a unit of 1 and exit 0."""
    import signal

    from featurescribe.harvest import harvester
    from featurescribe.harvest.harvester import HarvestConfig, harvest
    from featurescribe.interrupts import Interrupted

    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog; def f(x): return x + 1\n" * 40)
    batches = iter(range(100))

    def ctrl_c_at_the_third_batch():  # the harvest loop's own check, as a signal makes it raise
        if next(batches) == 2:
            raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(harvester, "stop_if_received", ctrl_c_at_the_third_batch)
    with pytest.raises(Interrupted):
        harvest(HarvestConfig(db=hdb, model="smollm2-135m", layer=2, corpus=str(corpus), ctx=16, max_tokens=160,
                              batch_size=2, threshold=0.2, progress=False), loaded=smollm2)
    before = _digest(hdb)
    assert main(["steer", "--db", hdb, "--source", "2-mlp", "--feature", "3", "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err.strip() == (
        "featurescribe: error: source 2-mlp is not fully harvested (its harvest was interrupted or is still "
        "running): run the same harvest command again to finish it first")
    assert _digest(hdb) == before


def test_an_interrupted_steer_says_nothing_was_written(hdb, monkeypatch, capsys):
    """Not the resumable commands' 'run the same command again to go on': steer writes nothing."""
    import signal

    from featurescribe.interrupts import Interrupted
    from featurescribe.steer.generate import Steerer

    def ctrl_c(*args, **kwargs):  # as the signal handler makes generation raise
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(Steerer, "generate", ctrl_c)
    before = _digest(hdb)
    assert main(["steer", "--db", hdb, "--source", "3-mlp", "--feature", "3", "--prompt", "Hi"]) == 130
    assert capsys.readouterr().err.strip() == "featurescribe: interrupted (SIGINT); nothing was written"
    assert _digest(hdb) == before


@pytest.mark.parametrize("sql,message", [
    ("UPDATE sources SET model_id = 'no-such-model'", "cannot load the model of this source: unknown model"),
    ("UPDATE sources SET layer = 99", "layer 99 is out of range: the model has 30 layers"),
    ("UPDATE sources SET width = 10", "records 10"),
])
def test_steer_a_source_that_cannot_be_steered_here(hdb, capsys, sql, message):
    from featurescribe.store import open_db

    con = open_db(hdb)
    con.execute(sql)
    con.close()
    before = _digest(hdb)
    assert main(["steer", "--db", hdb, "--source", "3-mlp", "--feature", "3", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert _digest(hdb) == before
    assert main(["steer", "--db", hdb, "--source", "3-nope", "--feature", "3", "--prompt", "Hi"]) == 2
    assert "no source '3-nope' (sources in this database: 3-mlp)" in capsys.readouterr().err


def test_steer_an_sae_latent_adds_its_decoder_row(tmp_path, local, capsys):
    """An SAE latent whose decoder row is the planted digits direction: steering it (strength in
    multiples of its max activation) adds that row, and the model writes digits."""
    from safetensors.torch import load_file, save_file

    from featurescribe.steer.planted import default_output_plants, plant_direction
    from featurescribe.store import open_db
    from tests.test_harvest_sae import write_sae

    folder = tmp_path / "sae"
    write_sae(folder, "standard", 576, 16, hook_name="blocks.20.hook_resid_post")
    w = load_file(str(folder / "sae_weights.safetensors"))
    w["W_dec"][0] = plant_direction(local.model, local.tokenizer, default_output_plants()[0]) * 240.0
    save_file(w, str(folder / "sae_weights.safetensors"))
    db = str(tmp_path / "sae.duckdb")
    assert main(["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "20", "--sae", str(folder),
                 "--max-tokens", "512", "--device", "cpu", "--no-progress"]) == 0
    source = capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1]
    con = open_db(db, read_only=True)
    max_act = con.execute("SELECT max_act FROM features WHERE source_id = ? AND feature_id = 0", [source]).fetchone()[0]
    con.close()
    strength = f"{0.5 / max_act:.6f}"  # adds half the residual norm along the digits direction
    assert main(["steer", "--db", db, "--source", source, "--feature", "0", "--prompt", "The weather today is",
                 "--prompt", "She looked at the", "--strength", strength, "--temperature", "0",
                 "--max-new-tokens", "10", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mode"] == "add" and res["hook"] == "model.layers.20.output"
    steered = "".join(r["steered"][f"{float(strength):g}"] for r in res["rows"])
    plain = "".join(r["unsteered"] for r in res["rows"])
    assert sum(c.isdigit() for c in steered) > sum(c.isdigit() for c in plain) + 5
