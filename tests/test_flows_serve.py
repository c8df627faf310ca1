"""`featurescribe serve`: the deployment it builds, and a served run that labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featurescribe.cli import main
from featurescribe.store import open_db
from tests.test_sampling import SOURCE, build_db

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sdb(tmp_path):
    db = str(tmp_path / "serve.duckdb")
    con = open_db(db)
    build_db(con, n_features=8)
    con.close()
    return db


def test_dry_run_prints_the_deployment(sdb, capsys):
    assert main(["serve", "--cron", "0 3 * * *", "--db", sdb, "--source", SOURCE,
                 "--features", "alive", "--dry-run"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["deployment"] == f"label/label-{SOURCE}"
    assert info["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC"}]
    p = info["parameters"]
    assert p["db"] == os.path.abspath(sdb) and p["source"] == SOURCE and p["features"] == "alive"


@pytest.mark.parametrize("args,msg", [
    (["--cron", "0 3 * *"], "bad --cron"),
    (["--cron", "0 0 3 * * *"], "bad --cron '0 0 3 * * *': five fields"),  # croniter's seconds field
    (["--cron", "0 3 31 2 *"], "bad --cron '0 3 31 2 *': it names no date that exists"),  # never fires
    (["--cron", "61 * * * *"], "bad --cron '61 * * * *': a field is out of range"),  # it said 'five fields'
    (["--cron", "* * 30 2 *", "--timezone", "Europe/Paris"], "so it would never run"),
    (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], "unknown --timezone"),
    (["--cron", "0 3 * * *", "--features", "0:99"], "outside the source"),
    (["--cron", "0 3 * * *", "--name", "nightly/6-mlp"], "bad --name 'nightly/6-mlp': Name 'nightly/6-mlp' contains"),
])
def test_user_errors_are_one_line(sdb, capsys, args, msg):
    assert main(["serve", "--db", sdb, "--source", SOURCE, "--dry-run", *args]) != 0
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_served_deployment_has_the_schedule_and_its_runs_label(sdb, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    env = dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurescribe", "serve", "--cron", "0 3 * * *", "--db", sdb,
         "--source", SOURCE, "--features", "alive", "--name", "nightly"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        dep = None
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while dep is None:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the deployment did not appear in 120 s"
                try:
                    dep = client.read_deployment_by_name("label/nightly")
                except Exception:
                    time.sleep(0.5)
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
        assert dep.parameters["source"] == SOURCE and dep.parameters["features"] == "alive"

        # a run started now (as the schedule would at 03:00) is run by the serving process
        fr = run_deployment("label/nightly", timeout=180)
        assert fr.state.is_completed(), fr.state
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    con = open_db(sdb, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM labels").fetchone()[0] == 6
        assert con.execute("SELECT flow, status, prefect_flow_run_id FROM runs").fetchall() == \
            [("label", "completed", str(fr.id))]
        # the scheduled run keeps its attempts by outcome (none: the default judges call no LLM)
        (outcomes,) = con.execute("SELECT call_outcomes FROM runs").fetchone()
        assert outcomes is not None and not any(json.loads(outcomes).values())
    finally:
        con.close()
