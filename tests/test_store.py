"""The store and the `init` / `sql` commands (issue 2)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from contextlib import closing

import duckdb
import pytest

from featurescribe.store import open_db
from featurescribe.store.schema import SCHEMA_VERSION, current_version
from tests.dbq import version1_database
from tests.mounts import tmpfs

DESIGN_TABLES = ["sources", "sequences", "activations", "features", "explanations", "scores",
                 "examples", "simulations", "llm_calls", "runs", "labels"]

DESIGN_COLUMNS = {
    "sources": ["source_id", "model_id", "hook_name", "layer", "kind", "width"],
    "sequences": ["seq_id", "token_ids", "tokens"],
    "activations": ["source_id", "feature_id", "seq_id", "pos", "act"],
    "features": ["source_id", "feature_id", "n_active", "frac_active", "max_act", "mean_act"],
    "explanations": ["explanation_id", "source_id", "feature_id", "text", "explainer", "method",
                     "run_id", "created_at"],
    "scores": ["explanation_id", "scorer", "value", "simulator", "n_examples", "details"],
    "examples": ["source_id", "feature_id", "seq_id", "start_pos", "end_pos", "split", "kind"],
    "simulations": ["explanation_id", "simulator", "seq_id", "start_pos", "split", "true_acts",
                    "predicted"],
    "llm_calls": ["call_id", "run_id", "backend", "model", "purpose", "prompt_hash", "input_tokens",
                  "output_tokens", "cost_usd", "latency_s", "status", "error"],
    "runs": ["run_id", "flow", "params", "status", "started_at", "finished_at"],
    "labels": ["source_id", "feature_id", "explanation", "score", "scorer", "explainer", "simulator"],
}


def cli(*args: str, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurescribe", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_init_creates_every_design_table_and_column(db_path):
    r = cli("init", "--db", db_path)
    assert r.returncode == 0, r.stderr
    con = duckdb.connect(db_path, read_only=True)
    for table, cols in DESIGN_COLUMNS.items():
        got = [c[0] for c in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
        ).fetchall()]
        assert got, f"{table} missing"
        for col in cols:
            assert col in got, f"{table}.{col} missing"
    assert current_version(con) == SCHEMA_VERSION
    con.close()


def test_help_lists_commands_both_ways():
    for argv in (["featurescribe", "--help"], [sys.executable, "-m", "featurescribe", "--help"]):
        exe = argv if argv[0] != "featurescribe" else [os.path.join(os.path.dirname(sys.executable), "featurescribe"), "--help"]
        r = subprocess.run(exe, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0
        for name in ("init", "sql"):
            assert name in r.stdout


def test_sql_formats(db_path):
    assert cli("init", "--db", db_path).returncode == 0
    q = "SELECT 1 AS a, 'x,y' AS b UNION ALL SELECT 2, NULL ORDER BY a"
    r = cli("sql", "--db", db_path, q, "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert list(csv.reader(io.StringIO(r.stdout))) == [["a", "b"], ["1", "x,y"], ["2", ""]]
    r = cli("sql", "--db", db_path, q, "--format", "json")
    assert json.loads(r.stdout) == [{"a": 1, "b": "x,y"}, {"a": 2, "b": None}]
    r = cli("sql", "--db", db_path, q)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["a", "b"] and lines[-1] == "(2 rows)"
    r = cli("sql", "--db", db_path, "SELECT string_agg(table_name, ',' ORDER BY table_name) AS t "
            "FROM information_schema.tables", "--format", "csv")
    names = r.stdout.splitlines()[-1].split(",")  # one column: written as it is, for scripts
    assert "activations" in names and "labels" in names
    r = cli("sql", "--db", db_path, "SELECT * FROM labels", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_sql_is_read_only_unless_asked(db_path):
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("sql", "--db", db_path, "CREATE TABLE t (x INTEGER)")
    assert r.returncode != 0 and "read-only" in r.stderr.lower() and "add --write to change it" in r.stderr
    r = cli("sql", "--db", db_path, "--write", "CREATE TABLE t (x INTEGER)")
    assert r.returncode == 0, r.stderr


def test_sql_write_script_that_fails_midway_changes_nothing(db_path):
    """DuckDB commits each statement of a script by itself: `sql --write` runs them as one
    transaction, so a statement that fails takes back those before it."""
    assert cli("init", "--db", db_path).returncode == 0
    assert cli("sql", "--db", db_path, "--write", "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1)").returncode == 0
    r = cli("sql", "--db", db_path, "--write", "INSERT INTO t VALUES (2); DELETE FROM t WHERE x = 1; "
            "INSERT INTO t VALUES ('not a number')")
    assert r.returncode == 2 and r.stderr.startswith("featurescribe: error: SQL error: Conversion Error")
    assert len(r.stderr.strip().splitlines()) == 1
    assert cli("sql", "--db", db_path, "SELECT x FROM t", "--format", "csv").stdout.split() == ["x", "1"]
    r = cli("sql", "--db", db_path, "--write", "INSERT INTO t VALUES (3); SELECT count(*) AS n FROM t", "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ["n", "2"]
    # a script with its own transactions keeps them
    r = cli("sql", "--db", db_path, "--write", "BEGIN; INSERT INTO t VALUES (4); COMMIT; SELECT count(*) AS n FROM t",
            "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ["n", "3"]


def test_sql_output_to_a_file_has_no_progress_bar(db_path):
    """DuckDB draws a progress bar on stdout for a query that runs a while (at once here)."""
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("sql", "--db", db_path, "--format", "csv", "SET progress_bar_time = 0; "
            "SELECT count(*) AS n FROM range(100000000) t(x) WHERE x % 7 = 3")
    assert r.returncode == 0 and r.stdout == "n\n14285714\n"


def test_sql_syntax_error_is_one_line(db_path):
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("sql", "--db", db_path, "SELEC 1")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert "syntax error" in r.stderr.lower()


@pytest.mark.parametrize("query", ["", "   ;  ", "-- only a comment"])
def test_sql_without_a_statement_is_one_line_exit_2(db_path, query):
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("sql", "--db", db_path, query)
    assert r.returncode == 2 and r.stderr.strip() == (
        'featurescribe: error: no SQL statement in the query: give one, e.g. "SELECT * FROM labels LIMIT 10"')


def test_init_twice_says_the_file_is_ready(db_path):
    assert cli("init", "--db", db_path).stdout.strip() == f"{db_path}: created (schema version {SCHEMA_VERSION})"
    before = open(db_path, "rb").read()
    assert cli("init", "--db", db_path).stdout.strip() == f"{db_path}: ready at schema version {SCHEMA_VERSION}"
    assert open(db_path, "rb").read() == before


@pytest.mark.parametrize("command", [["init"], ["sql", "SELECT 1"], ["harvest", "--model", "smollm2-135m", "--layer", "6"],
                                     ["label", "--source", "6-mlp"], ["report", "--out", "r.html"]])
@pytest.mark.parametrize("db", ["", ":memory:"])
def test_a_db_that_is_not_a_file_path_is_refused(tmp_path, command, db):
    r = cli(*command, "--db", db, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"featurescribe: error: --db {db!r}: give the path of a database file, e.g. --db features.duckdb")
    assert list(tmp_path.iterdir()) == []


def test_a_db_that_is_a_folder_says_so(tmp_path):
    r = cli("sql", "--db", str(tmp_path), "SELECT 1")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"featurescribe: error: --db {tmp_path} is a folder: give a database file, e.g. {tmp_path / 'featurescribe.duckdb'}")


def test_report_needs_out(db_path):
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("report", "--db", db_path)
    assert r.returncode == 2 and "the following arguments are required: --out" in r.stderr


def test_sql_on_missing_database_leaves_no_file(tmp_path):
    path = tmp_path / "typo.duckdb"
    r = cli("sql", "--db", str(path), "SELECT 1")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "no database" in r.stderr
    assert not path.exists()


def test_locked_database_names_the_holder_quickly(db_path):
    assert cli("init", "--db", db_path).returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({db_path!r})
            print("ready", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        for args in (["sql", "--db", db_path, "SELECT 1"], ["init", "--db", db_path]):
            t0 = time.monotonic()
            r = cli(*args, timeout=30)
            assert time.monotonic() - t0 < 30
            assert r.returncode != 0
            assert len(r.stderr.strip().splitlines()) == 1
            assert "locked" in r.stderr and f"PID {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_newer_schema_is_refused(db_path):
    con = open_db(db_path)
    con.execute("INSERT INTO schema_version (version) VALUES (?)", [SCHEMA_VERSION + 1])
    con.close()
    r = cli("sql", "--db", db_path, "SELECT 1")
    assert r.returncode != 0 and "newer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_older_database_upgrades_keeping_its_rows(db_path):
    # a database as version 1 wrote it
    version1_database(
        db_path, "INSERT INTO sources VALUES ('6-mlp', 'm', 'h', 6, 'neuron', 10)",
        "INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method)"
        " VALUES ('e1', '6-mlp', 3, 'digits', 'baseline:tokens', 'tokens')",
        "INSERT INTO scores VALUES ('e1', 'simulation', 0.5, 'lexical', 20, '{}')")
    # read-only use upgrades it first
    r = cli("sql", "--db", db_path, "SELECT feature_id, explanation, score FROM labels", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"feature_id": 3, "explanation": "digits", "score": 0.5}]
    con = open_db(db_path, read_only=True)
    assert current_version(con) == SCHEMA_VERSION
    assert con.execute("SELECT site FROM sources").fetchall() == [(None,)]
    con.close()


def test_bulk_insert_from_arrow(con):
    import numpy as np

    from featurescribe.store.bulk import insert_arrow

    n = 100_000
    rows = insert_arrow(con, "activations", {
        "source_id": ["0-mlp"] * n,
        "feature_id": np.arange(n, dtype=np.int32) % 7,
        "seq_id": np.arange(n, dtype=np.int64) // 64,
        "pos": np.arange(n, dtype=np.int32) % 64,
        "act": np.linspace(0, 1, n, dtype=np.float32),
    })
    assert rows == n
    assert con.execute("SELECT count(*), count(DISTINCT feature_id) FROM activations").fetchone() == (n, 7)


def test_bulk_insert_with_constants_while_a_result_is_half_read(con):
    """DuckDB 2.0 refuses `con.register` while a result is partly fetched; the insert must still work,
    and constant columns arrive as one value for every row."""
    from featurescribe.store.bulk import insert_arrow

    con.execute("CREATE TEMP TABLE many AS SELECT range AS x FROM range(50000)")
    pending = con.execute("SELECT x FROM many")
    assert len(pending.fetchmany(5)) == 5
    rows = insert_arrow(con, "activations", {"feature_id": [3, 4], "seq_id": [1, 1], "pos": [0, 1],
                                             "act": [0.5, 0.25]}, consts={"source_id": "2-resid"})
    assert rows == 2
    assert con.execute("SELECT source_id, feature_id, act FROM activations ORDER BY feature_id").fetchall() == [
        ("2-resid", 3, 0.5), ("2-resid", 4, 0.25)]


def test_labels_view_prefers_simulation_then_best(con):
    con.execute("INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method)"
                " VALUES ('a', 's', 1, 'A', 'x', 'm'), ('b', 's', 1, 'B', 'x', 'm'), ('c', 's', 2, 'C', 'x', 'm')")
    con.execute("INSERT INTO scores (explanation_id, scorer, value, simulator, split, baseline_shuffled) VALUES"
                " ('a', 'simulation', 0.3, 'lexical', 'test', 0.1), ('b', 'simulation', 0.6, 'lexical', 'test', 0.2),"
                " ('b', 'detection', 0.9, 'lexical', 'test', NULL), ('c', 'detection', 0.7, 'lexical', 'test', NULL)")
    rows = con.execute("SELECT feature_id, explanation, scorer, score, lift FROM labels ORDER BY 1").fetchall()
    assert rows[0][:4] == (1, "B", "simulation", 0.6) and rows[0][4] == pytest.approx(0.4)
    assert rows[1][:4] == (2, "C", "detection", 0.7)


def test_labels_view_shows_test_scores_only(con):
    """A candidate chosen on `valid` whose test scoring failed has no label: its valid score (the
    split it was picked on) is not a held-out score."""
    con.execute("INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, method)"
                " VALUES ('a', 's', 1, 'A', 'x', 'm'), ('b', 's', 1, 'B', 'x', 'm'), ('c', 's', 2, 'C', 'x', 'm')")
    con.execute("INSERT INTO scores (explanation_id, scorer, value, simulator, split) VALUES"
                " ('a', 'simulation', 0.2, 'lexical', 'valid'), ('b', 'simulation', 0.5, 'lexical', 'valid'),"
                " ('b', 'simulation', 0.4, 'lexical', 'test'), ('c', 'simulation', 0.9, 'lexical', 'valid')")
    assert con.execute("SELECT feature_id, explanation, score, split FROM labels").fetchall() == [
        (1, "B", 0.4, "test")]


def test_sql_writes_to_a_view_say_which_tables_to_change(db_path):
    from featurescribe.store.bulk import insert_arrow

    con = open_db(db_path, create=True)
    insert_arrow(con, "activations", {"source_id": ["6-mlp", "6-mlp", "3-mlp"], "feature_id": [1, 2, 1],
                                      "seq_id": [0, 0, 0], "pos": [1, 2, 1], "act": [0.5, 0.25, 1.0]})
    con.close()
    r = cli("sql", "--db", db_path, "--write", "DELETE FROM activations WHERE source_id = '6-mlp'")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "Can only delete from base table (activations is a view over activation_rows" in r.stderr
    # the statement the hint gives works as written
    r = cli("sql", "--db", db_path, "--write", "DELETE FROM activation_rows WHERE source_key = "
            "(SELECT source_key FROM source_keys WHERE source_id = '6-mlp')")
    assert r.returncode == 0, r.stderr
    r = cli("sql", "--db", db_path, "SELECT source_id, count(*) FROM activations GROUP BY ALL", "--format", "csv")
    assert r.stdout.splitlines()[1:] == ["3-mlp,1"]
    r = cli("sql", "--db", db_path, "--write", "UPDATE labels SET score = 1")
    assert r.returncode == 2 and "(labels is a view of the best-scored explanation per feature: " \
                                 "change explanations or scores)" in r.stderr


def test_init_on_a_full_disk_leaves_no_broken_file(tmp_path):
    """DuckDB had written the first page of the new file when the disk filled: every later command,
    once there was space, failed on it ('Could not read enough bytes')."""
    with tmpfs(tmp_path / "small", "size=1m") as mnt:  # a new database's checkpoint needs ~530 KB
        (mnt / "pad").write_bytes(b"\0" * 1_044_000)  # one page left
        db = str(mnt / "f.duckdb")
        r = cli("init", "--db", db)
        assert r.returncode == 1 and r.stderr.startswith("featurescribe: error: the disk is full (")
        assert len(r.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in mnt.iterdir()) == ["pad"]
        (mnt / "pad").unlink()
        assert cli("init", "--db", db).returncode == 0
        assert cli("sql", "--db", db, "SELECT count(*) AS n FROM sources", "--format", "csv").stdout.split() == ["n", "0"]


def test_commands_that_only_read_add_no_tables_to_another_programs_duckdb(tmp_path):
    """`sql` (read-only) upgraded any DuckDB file it was pointed at: someone's own database gained
    featurescribe's tables and a schema_version."""
    import hashlib

    db = str(tmp_path / "theirs.duckdb")
    con = duckdb.connect(db)
    con.execute("CREATE TABLE measurements (x INTEGER)")
    con.close()
    before = hashlib.sha256(open(db, "rb").read()).hexdigest()
    for args in (["sql", "SELECT * FROM measurements"], ["export", "--format", "json", "--out", str(tmp_path / "e")],
                 ["report", "--out", str(tmp_path / "r.html")]):
        r = cli(*args, "--db", db)
        assert r.returncode == 2 and r.stderr.strip() == (
            f"featurescribe: error: database {db} is not a featurescribe database (it has no schema_version "
            f"table); a command that only reads adds none: give another --db, or add the tables with: "
            f"featurescribe init --db {db}"), r.stderr
    assert hashlib.sha256(open(db, "rb").read()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.duckdb"]


def test_sql_table_lines_up_wide_and_combining_characters(db_path):
    """Column widths counted code points: a CJK character or an emoji takes two cells on a terminal,
    so every row with one pushed the columns after it out of line."""
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("sql", "--db", db_path, "SELECT * FROM (VALUES (1, 'abc', 'x'), (2, '特徴量', 'y'), (3, '🙂🙂', 'z'), "
            "(4, 'e\u0301te\u0301', 'w')) t(n, token, after) ORDER BY n")
    assert r.returncode == 0, r.stderr
    header, rule, *rows, count = r.stdout.splitlines()
    assert count == "(4 rows)" and len(rows) == 4
    wide = {"特": 2, "徴": 2, "量": 2, "🙂": 2, "\u0301": 0}

    def cells_before(line: str, ch: str) -> int:  # display cells before the last column's value
        return sum(wide.get(c, 1) for c in line[:line.rindex(ch)])

    starts = {cells_before(line, last) for line, last in zip(rows, "xyzw")}
    assert starts == {cells_before(header, "after")}, r.stdout
    assert rule.split() == ["-", "-" * 6, "-" * 5]
    # a value over 60 cells is cut at 60 cells, not at 60 characters (40 CJK characters are 80 cells)
    r = cli("sql", "--db", db_path, "SELECT repeat('語', 40) AS long")
    value = r.stdout.splitlines()[2]
    assert value == "語" * 29 + "…", value


def test_sql_write_adds_no_tables_to_another_programs_duckdb(tmp_path):
    """`sql --write` (and a writable Python handle) upgraded any DuckDB file it was pointed at:
    someone's own database gained featurescribe's tables before their statement ran."""
    import hashlib

    import featurescribe

    db = str(tmp_path / "theirs.duckdb")
    con = duckdb.connect(db)
    con.execute("CREATE TABLE measurements (x INTEGER)")
    con.close()
    before = hashlib.sha256(open(db, "rb").read()).hexdigest()
    r = cli("sql", "--db", db, "--write", "INSERT INTO measurements VALUES (1)")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"featurescribe: error: database {db} is not a featurescribe database (it has no schema_version "
        f"table); only init adds them to an existing file: give another --db, or add the tables with: "
        f"featurescribe init --db {db}"), r.stderr
    with pytest.raises(featurescribe.BadOption, match="is not a featurescribe database"):
        featurescribe.open(db, read_only=False)
    assert hashlib.sha256(open(db, "rb").read()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.duckdb"]
    con = duckdb.connect(db, read_only=True)
    assert con.execute("SELECT table_name FROM information_schema.tables").fetchall() == [("measurements",)]
    con.close()
    # init is how the tables are added when that is meant
    assert cli("init", "--db", db).returncode == 0
    assert cli("sql", "--db", db, "--write", "INSERT INTO measurements VALUES (1)").returncode == 0


def test_init_whose_checkpoint_finds_the_disk_full_says_so_and_leaves_no_files(tmp_path):
    """With room for the new file but not for its checkpoint, init said 'created' while the schema
    was only in f.duckdb.wal (DuckDB checkpoints at closing and says nothing when that fails)."""
    with tmpfs(tmp_path / "small", "size=1m") as mnt:
        (mnt / "pad").write_bytes(b"\0" * 768 * 1024)  # 256 KiB left: the file is made, its checkpoint fails
        db = str(mnt / "f.duckdb")
        r = cli("init", "--db", db)
        assert r.returncode == 1 and r.stderr.startswith("featurescribe: error: the disk is full ("), r.stdout
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
        assert sorted(p.name for p in mnt.iterdir()) == ["pad"]
        (mnt / "pad").unlink()
        r = cli("init", "--db", db)
        assert r.returncode == 0 and sorted(p.name for p in mnt.iterdir()) == ["f.duckdb"]


def test_sql_write_that_leaves_its_own_transaction_open_says_nothing_was_kept(db_path):
    """'BEGIN; INSERT ...' without a COMMIT printed the insert's count and exit 0, but DuckDB rolls
    an open transaction back when the connection closes: the change was lost without a word."""
    assert cli("init", "--db", db_path).returncode == 0
    assert cli("sql", "--db", db_path, "--write", "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1)").returncode == 0
    r = cli("sql", "--db", db_path, "--write", "BEGIN; INSERT INTO t VALUES (2)")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip() == (
        "featurescribe: error: SQL error: the query ends inside a transaction (a BEGIN without a COMMIT "
        "after it), so what it changed since that BEGIN was rolled back: end it with COMMIT")
    r = cli("sql", "--db", db_path, "--write", "INSERT INTO t VALUES (3); BEGIN; INSERT INTO t VALUES (4)")
    assert r.returncode == 2  # what was committed before the BEGIN is kept, as DuckDB commits it
    assert cli("sql", "--db", db_path, "SELECT x FROM t ORDER BY x", "--format", "csv").stdout.split() == ["x", "1", "3"]
    # reading needs no COMMIT: nothing is lost
    r = cli("sql", "--db", db_path, "BEGIN; SELECT count(*) AS n FROM t", "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ["n", "2"]


def test_sql_table_shows_control_characters_escaped(db_path):
    """Only a newline was escaped: a tab in a value jumped to the terminal's next tab stop, a carriage
    return sent the rest of the row over its start, and an ANSI escape (a corpus token can hold one)
    reached the terminal and recoloured it."""
    assert cli("init", "--db", db_path).returncode == 0
    r = cli("sql", "--db", db_path, "SELECT 'a' || chr(9) || 'b' AS v, 'x' AS w UNION ALL "
            "SELECT 'c' || chr(13) || 'd', 'y' UNION ALL SELECT chr(27) || '[31mred', 'z' UNION ALL "
            "SELECT 'e' || chr(10) || 'f', 'q'")
    assert r.returncode == 0, r.stderr
    shown = ["a\\tb", "c\\rd", "\\x1b[31mred", "e\\nf"]
    assert r.stdout.splitlines()[2:6] == [f"{v:<11}  {w}" for v, w in zip(shown, "xyzq")]


def _damaged_copies(tmp_path) -> dict[str, str]:
    """A database cut short in a data block, one with a data block overwritten, and one cut after
    its headers."""
    from tests.export_fixtures import build_large_db

    whole = str(tmp_path / "whole.duckdb")
    build_large_db(whole, 2000)
    con = duckdb.connect(whole, read_only=True)
    block = con.execute("SELECT max(block_id) FROM pragma_storage_info('sequences')").fetchone()[0]
    block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
    con.close()
    data = open(whole, "rb").read()
    at = 3 * 4096 + block * block_size + 100  # DuckDB's blocks follow its three 4 KiB headers
    cut, overwritten = str(tmp_path / "cut.duckdb"), str(tmp_path / "overwritten.duckdb")
    headers_only = str(tmp_path / "headers-only.duckdb")  # this one fails at opening
    open(cut, "wb").write(data[:at])
    open(overwritten, "wb").write(data[:at] + b"\x55" * 64 + data[at + 64:])
    open(headers_only, "wb").write(data[:3 * 4096 + 100])
    return {cut: "Could not read enough bytes", overwritten: "Corrupt database file",
            headers_only: "Could not read enough bytes"}


def test_a_damaged_database_is_one_line_for_every_command(tmp_path):
    """A file cut short (a copy that stopped midway) or overwritten in a block opened fine, and the
    first read of the block gave export and report a DuckDB traceback; sql called it bad SQL."""
    for db, duckdb_says in _damaged_copies(tmp_path).items():
        before = open(db, "rb").read()
        for args in (["export", "--format", "json", "--out", str(tmp_path / f"e-{os.path.basename(db)}")],
                     ["report", "--out", str(tmp_path / "r.html")],
                     ["sql", "SELECT sum(len(tokens)) FROM sequences"]):
            r = cli(*args, "--db", db)
            *progress, error = r.stderr.strip().splitlines()  # export logs its progress first
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
            assert error.startswith(f"featurescribe: error: database {db} is damaged (") and duckdb_says in error
            assert error.endswith("restore it from a copy, or harvest into a new file"), error
        assert open(db, "rb").read() == before


def test_reading_an_older_database_on_a_read_only_mount_says_why_it_must_write(tmp_path):
    """An older database is upgraded before it is read; on a read-only mount that failed with DuckDB's
    'Cannot open file ...: Read-only file system', as if the file could not be read at all."""
    from tests.mounts import remount

    with tmpfs(tmp_path / "ro", "size=4m") as mnt:
        db = str(mnt / "v1.duckdb")
        version1_database(db)
        remount(mnt, "ro,size=4m")
        try:
            r = cli("sql", "--db", db, "SELECT count(*) FROM sources")
        finally:
            remount(mnt, "rw,size=4m")
        assert r.returncode == 2 and r.stderr.strip() == (
            f"featurescribe: error: database {db} has schema version 1, older than this featurescribe reads "
            f"({SCHEMA_VERSION}), and upgrading it needs it writable: it is not (Read-only file system); "
            f"upgrade it once where it can be written, with: featurescribe init --db {db}"), r.stderr


def test_a_sqlite_file_is_named_as_one_without_duckdb_reaching_for_an_extension(tmp_path):
    """DuckDB opens a SQLite file through its sqlite extension, which it tried to download:
    'cannot open database s.db: IO Error: Failed to download extension "sqlite_scanner" at URL
    "http://extensions.duckdb.org/..."', a network request and a line that hid the mistake."""
    import sqlite3

    db = str(tmp_path / "notes.db")
    with closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE notes (x)")
        con.commit()
    before = open(db, "rb").read()
    for args in (["sql", "SELECT 1"], ["sql", "--write", "SELECT 1"], ["init"]):
        r = cli(*args, "--db", db)
        assert r.returncode == 2 and r.stderr.strip() == (
            f"featurescribe: error: database {db} is a SQLite file, not a DuckDB database: give a DuckDB file"), r.stderr
    assert open(db, "rb").read() == before


def test_a_db_that_is_a_pipe_is_refused_at_once(tmp_path):
    """A path that exists but is no regular file counted as a new database: init on a named pipe
    waited forever for a writer, and sql said 'no database ... create one with init'."""
    fifo = tmp_path / "f.duckdb"
    os.mkfifo(fifo)
    for args in (["init"], ["sql", "SELECT 1"], ["sql", "--write", "SELECT 1"]):
        r = cli(*args, "--db", str(fifo), timeout=30)
        assert r.returncode == 2 and r.stderr.strip() == (
            f"featurescribe: error: --db {fifo} is not a regular file (a pipe, a device or a socket): give a "
            f"database file"), r.stderr
    assert fifo.is_fifo()


def test_sql_keeps_every_column_when_names_repeat(db_path):
    """A join's SELECT * repeats names: the JSON rows were dicts by name, so a later column of the
    same name overwrote the earlier one without a word. Repeats get DuckDB's own pandas names."""
    import featurescribe

    assert cli("init", "--db", db_path).returncode == 0
    q = "SELECT * FROM (SELECT 1 AS x, 3 AS x_1) t1, (SELECT 2 AS x) t2"
    r = cli("sql", "--db", db_path, q, "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == [{"x": 1, "x_1": 3, "x_2": 2}], r.stdout
    assert cli("sql", "--db", db_path, q, "--format", "csv").stdout.splitlines() == ["x,x_1,x_2", "1,3,2"]
    assert featurescribe.open(db_path).sql(q).to_dicts() == [{"x": 1, "x_1": 3, "x_2": 2}]


def test_a_db_path_the_system_cannot_use_is_one_line(tmp_path):
    """A name over the file system's limit was a traceback (OSError: File name too long, from the
    check for an existing file); a path ending in '/' made a file named like the folder meant."""
    long_name = str(tmp_path / ("a" * 300 + ".duckdb"))
    for args in (["init"], ["sql", "SELECT 1"]):
        r = cli(*args, "--db", long_name)
        assert r.returncode == 2 and r.stderr.strip() == (
            f"featurescribe: error: --db {long_name} cannot be used: File name too long"), r.stderr[-1000:]
    folder = str(tmp_path / "out") + "/"
    r = cli("init", "--db", folder)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"featurescribe: error: --db {folder} ends in '/', which names a folder: give a database file, "
        f"e.g. {tmp_path / 'out' / 'featurescribe.duckdb'}"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sql_write_on_a_full_disk_is_the_disk_full_line_and_changes_nothing(tmp_path):
    """It said 'SQL error: IO Error: Could not write file ...: No space left on device', exit 2, as
    if the SQL were wrong; every other command gives the disk-full line and exit 1."""
    with tmpfs(tmp_path / "small", "size=2m") as mnt:
        db = str(mnt / "f.duckdb")
        assert cli("init", "--db", db).returncode == 0
        r = cli("sql", "--db", db, "--write",
                "CREATE TABLE big AS SELECT range AS x, md5(range::VARCHAR) AS h FROM range(1000000)")
        assert r.returncode == 1 and r.stderr.startswith("featurescribe: error: the disk is full ("), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = cli("sql", "--db", db, "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'big'",
                "--format", "csv")
        assert r.returncode == 0 and r.stdout.split() == ["n", "0"]


def test_a_label_run_on_a_damaged_database_is_its_one_line(tmp_path, prefect_server):
    """Inside a flow, Prefect logged the DuckDB error with its traceback ('Encountered exception
    during execution') before the command's own line, and the task was retried as if it might pass."""
    damaged = [db for db, says in _damaged_copies(tmp_path).items() if says == "Corrupt database file"]
    env = dict(os.environ, PREFECT_API_URL=prefect_server)
    r = subprocess.run([sys.executable, "-m", "featurescribe", "label", "--db", damaged[0], "--source", "8-res-sae1m",
                        "--features", "0:4", "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Encountered exception" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in errors if line.startswith(f"featurescribe: error: database {damaged[0]} is damaged (")]
    assert len(errors) == 1, r.stderr


def test_the_python_handle_on_a_damaged_database_raises_one_featurescribe_error(tmp_path):
    """The handle let DuckDB's own error out (`_duckdb.Error: Corrupt database file ...`), where a
    notebook catches featurescribe's errors."""
    import featurescribe

    for db, duckdb_says in _damaged_copies(tmp_path).items():
        with pytest.raises(featurescribe.FeaturescribeError, match=f"^database {db} is damaged \\(.*{duckdb_says}"):
            featurescribe.open(db).sql("SELECT sum(len(tokens)) FROM sequences")
        if duckdb_says == "Corrupt database file":
            with pytest.raises(featurescribe.FeaturescribeError, match="is damaged"):
                featurescribe.open(db).feature("8-res-sae1m", 1)


def test_a_new_path_another_process_made_first_is_not_removed_on_our_error(tmp_path, monkeypatch):
    """Two harvests of one new path started together: both found no file, the other made it and
    wrote its rows, and then this one's opening failed (here a Ctrl-C while it reads the schema).
    It removed the file as if it had made it, with the other's rows. The race is pinned by making
    this opening look before the other's file exists (`_is_new` answers True)."""
    from featurescribe.store import connection

    db = str(tmp_path / "shared.duckdb")
    with closing(open_db(db)) as theirs:
        theirs.execute("INSERT INTO sources (source_id, model_id, hook_name, layer, kind, width) "
                       "VALUES ('6-mlp', 'm', 'h', 6, 'neuron', 10)")

    def interrupted(con, *args, **kwargs):
        con.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(connection, "_is_new", lambda path, create: True)
    monkeypatch.setattr(connection, "_upgraded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_db(db)
    monkeypatch.undo()
    with closing(open_db(db, read_only=True, create=False)) as con:
        assert con.execute("SELECT source_id FROM sources").fetchall() == [("6-mlp",)]
