"""deploy/prefect.yaml against a real `prefect server start` on 127.0.0.1: `prefect deploy`
accepts it, with the work pools and the nightly schedule it names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_prefect_deploy_accepts_the_work_pool_file(tmp_path):
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "prefect server start exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer in 90 s"
                time.sleep(0.5)

        def prefect(*args):
            r = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout

        prefect("work-pool", "create", "gpu-pool", "--type", "process")
        prefect("work-pool", "create", "cpu-pool", "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")

        code = ("from prefect.client.orchestration import get_client\n"
                "with get_client(sync_client=True) as c:\n"
                "    for d in sorted(c.read_deployments(), key=lambda d: d.name):\n"
                "        print(d.name, d.work_pool_name, [s.schedule.cron for s in d.schedules],\n"
                "              d.parameters.get('db'))\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout.splitlines()
        assert out == [
            "export cpu-pool [] /data/featurescribe.duckdb",
            "harvest-gpu gpu-pool [] /data/featurescribe.duckdb",
            "label-nightly cpu-pool ['0 3 * * *'] /data/featurescribe.duckdb",
        ]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
