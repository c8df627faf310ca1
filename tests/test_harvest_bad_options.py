"""Option values of `harvest` that are refused before any work: one `featurescribe: error:` line,
exit status 2, no database file (each case fails before the model is loaded)."""

from __future__ import annotations

import os

import pytest

from featurescribe.cli import main
from featurescribe.harvest.sources import parse_layers
from featurescribe.harvest.thresholds import parse_threshold


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    return str(p)


@pytest.mark.parametrize("extra,msg", [
    (["--layer", "6-"], "bad --layer '6-'"),
    (["--layer", "-6"], "bad --layer '-6'"),
    (["--layer", "3-6-9"], "bad --layer '3-6-9'"),
    (["--layer", "\u0663"], "bad --layer"),  # ARABIC-INDIC DIGIT THREE: int() reads it, a layer spec does not
    (["--layer", "6", "--threshold", "nan"], "bad --threshold 'nan'"),
    (["--layer", "6", "--threshold", "inf"], "bad --threshold 'inf'"),
    (["--layer", "6", "--threshold", "1e400"], "bad --threshold '1e400'"),
    (["--layer", "6", "--source-id", ""], "bad --source-id ''"),
    (["--layer", "6", "--source-id", ".."], "bad --source-id '..'"),
    (["--layer", "6", "--source-id", "a/b"], "bad --source-id 'a/b'"),
    (["--layer", "6", "--source-id", "my source"], "bad --source-id 'my source'"),
])
def test_refused_before_any_work(tmp_path, corpus_file, capsys, extra, msg):
    db = str(tmp_path / "h.duckdb")
    rc = main(["harvest", "--db", db, "--model", "smollm2-135m", "--corpus", corpus_file, "--no-progress"] + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("featurescribe: error: ") and len(err.strip().splitlines()) == 1, err
    assert msg in err
    assert not os.path.exists(db)


GOOD_LINE = '{"text": "The quick brown fox jumps over the lazy dog, again and again."}\n'


@pytest.mark.parametrize("bad,msg", [
    ('{"text": 42}', "line 301's field 'text' is a JSON number, not a string"),
    ('{"text": ["a", "b"]}', "line 301's field 'text' is a JSON array, not a string"),
    ('{"body": "x", "id": 3}', "line 301 has no field 'text' (fields: body, id)"),
    ('"just a string"', "line 301 is a JSON string, not an object"),
])
def test_a_jsonl_line_without_string_text_is_refused_before_any_work(tmp_path, capsys, bad, msg):
    """Such a line was skipped silently (a Parquet corpus's non-string column is refused); the line
    comes after many batches' worth of good ones, and still nothing is written."""
    path = tmp_path / "corpus.jsonl"
    path.write_text(GOOD_LINE * 300 + bad + "\n" + GOOD_LINE)
    db = str(tmp_path / "h.duckdb")
    err = _one_error(["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "1", "--corpus", str(path),
                      "--ctx", "8", "--batch-size", "2", "--no-progress"], capsys)
    assert f"corpus {path}: {msg}" in err
    assert not os.path.exists(db)


def test_a_bad_jsonl_line_past_the_checked_head_stops_the_harvest_there(tmp_path, capsys, monkeypatch):
    """Only the file's head is checked before the harvest (a corpus of gigabytes is not read twice);
    a bad line further on ends the harvest in the same one line when it is reached, and the source
    is left unfinished, which export refuses."""
    from featurescribe.harvest import corpus

    monkeypatch.setattr(corpus, "_JSONL_CHECK_BYTES", 200)
    path = tmp_path / "corpus.jsonl"
    path.write_text(GOOD_LINE * 300 + '{"text": 42}\n' + GOOD_LINE)
    db = str(tmp_path / "h.duckdb")
    err = _one_error(["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "1", "--corpus", str(path),
                      "--ctx", "8", "--batch-size", "2", "--max-tokens", "0", "--no-progress"], capsys)
    assert f"corpus {path}: line 301's field 'text' is a JSON number, not a string" in err
    assert os.path.exists(db)
    err = _one_error(["export", "--db", db, "--format", "json", "--out", str(tmp_path / "out")], capsys)
    assert "is not fully harvested" in err


def test_a_binary_txt_corpus_is_refused_before_any_work(tmp_path, capsys):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 64)
    db = str(tmp_path / "h.duckdb")
    err = _one_error(["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "1", "--corpus", str(path),
                      "--no-progress"], capsys)
    assert f"corpus {path} is not text: it has a NUL byte (at byte 0)" in err
    assert not os.path.exists(db)


def test_layer_specs_still_read():
    assert parse_layers("6") == [6]
    assert parse_layers(" 3, 6 ,9") == [3, 6, 9]
    assert parse_layers("0-2,2") == [0, 1, 2]
    assert parse_layers("ALL", n_layers=3) == [0, 1, 2]


def test_thresholds_still_read():
    assert parse_threshold(0.5) == ("abs", 0.5)
    assert parse_threshold("-1") == ("abs", -1.0)
    assert parse_threshold("2%") == ("keep", 0.02)
    assert parse_threshold("auto") == ("keep", 0.01)
    with pytest.raises(ValueError):
        parse_threshold(float("nan"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("featurescribe: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_dask_options_refused_before_any_work(tmp_path, corpus_file, capsys):
    db = str(tmp_path / "h.duckdb")
    base = ["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "6", "--corpus", corpus_file,
            "--no-progress", "--shards", "2", "--task-runner", "dask"]
    nobody = f"tcp://127.0.0.1:{_free_port()}"
    assert "--workers must be at least 1" in _one_error(base + ["--workers", "0"], capsys)
    assert f"cannot reach the Dask scheduler at {nobody}" in _one_error(base + ["--dask-address", nobody], capsys)
    assert "bad --dask-address 'nowhere'" in _one_error(base + ["--dask-address", "nowhere"], capsys)
    assert not os.path.exists(db) and not os.path.exists(db + ".shards")
    label = ["label", "--db", db, "--source", "6-mlp", "--task-runner", "dask", "--dask-address", nobody]
    assert "cannot reach the Dask scheduler" in _one_error(label, capsys)
    assert not os.path.exists(db)


def test_workers_below_one_and_a_seed_out_of_range_are_refused_by_the_cli_and_the_api(tmp_path, corpus_file, capsys):
    """With the thread runner, workers=0 and seed=-1 were accepted (from Python and on the command
    line alike); the Dask runner refused workers=0, steer refused seed=-1."""
    import featurescribe as fs

    db = str(tmp_path / "h.duckdb")
    harvest = ["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "6", "--corpus", corpus_file,
               "--no-progress"]
    label = ["label", "--db", db, "--source", "6-mlp"]
    seed_line = "--seed must be a whole number from 0 to 9223372036854775807"
    for argv, line in ((harvest + ["--workers", "0"], "--workers must be at least 1"),
                       (harvest + ["--shards", "2", "--workers", "0"], "--workers must be at least 1"),
                       (label + ["--workers", "0"], "--workers must be at least 1"),
                       (label + ["--seed", "-1"], f"{seed_line}, not -1"),
                       (label + ["--seed", str(2**63)], f"{seed_line}, not {2**63}")):
        assert _one_error(argv, capsys).strip() == f"featurescribe: error: {line}"
    for call, line in ((lambda: fs.harvest(db, model="smollm2-135m", layer="6", corpus=corpus_file, workers=0),
                        "--workers must be at least 1"),
                       (lambda: fs.label(db, source="6-mlp", workers=0, task_runner="thread"),
                        "--workers must be at least 1"),
                       (lambda: fs.label(db, source="6-mlp", seed=-1), f"{seed_line}, not -1")):
        with pytest.raises(fs.BadOption) as info:
            call()
        assert str(info.value) == line
    assert not os.path.exists(db)


def test_a_dask_address_without_the_dask_runner_is_refused(tmp_path, corpus_file, capsys):
    db = str(tmp_path / "h.duckdb")
    base = ["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "6", "--corpus", corpus_file,
            "--no-progress", "--dask-address", "tcp://127.0.0.1:8786"]
    for extra in ([], ["--shards", "2"], ["--task-runner", "dask"]):  # it was silently ignored
        assert _one_error(base + extra, capsys).strip() == ("featurescribe: error: --dask-address is for a sharded "
                                                            "harvest on Dask: add --shards N --task-runner dask")
    label = ["label", "--db", db, "--source", "6-mlp", "--dask-address", "tcp://127.0.0.1:8786"]
    assert _one_error(label, capsys).strip() == (
        "featurescribe: error: --dask-address is for the Dask task runner: add --task-runner dask")
    assert not os.path.exists(db) and not os.path.exists(db + ".shards")


def test_a_listening_address_where_no_scheduler_answers_is_refused():
    """Something listens, but it is no Dask scheduler (tests/test_flows_dask.py checks a real one)."""
    import socket

    from featurescribe.errors import FeaturescribeError
    from featurescribe.flows.runners import check_scheduler

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(FeaturescribeError, match=f"no Dask scheduler answers at {address}"):
            check_scheduler(address, timeout_s=1.0)
