"""Progress that moves per feature, with the calls paid for and the dollars spent: plain lines
when not on a terminal, and the label flow's progress artifact in Prefect."""

from __future__ import annotations

import io
import json

import pytest

from featurescribe.cli import main
from featurescribe.flows.label_progress import LabelProgress
from featurescribe.llm.budget import Budget
from featurescribe.progress import Progress
from tests.dbq import q
from tests.test_sampling import SOURCE

pytestmark = pytest.mark.usefixtures("no_global_limits")


def test_features_count_as_they_finish_and_chunks_top_up():
    out = io.StringIO()
    budget = Budget(None)
    with Progress("label", total=6, unit="features", every_s=0.0, stream=out) as bar:
        progress = LabelProgress(bar, budget, total=6)
        budget.add(0.25)
        progress.feature_done(chunk_key=0)  # one feature of the chunk [0, 1, 2] is done
        budget.add(0.5)
        progress.feature_done(chunk_key=0)
        assert bar.done == 2
        progress.chunk_written([0, 1, 2])  # the third (skipped, say) counts when the chunk is written
        assert bar.done == 3
        progress.chunk_written([3, 4, 5], ledger_rows=4)  # a chunk computed elsewhere
        assert bar.done == 6 and progress.calls == 6
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("label: 1/6 features (") and lines[0].endswith("1 paid calls, $0.2500)")
    assert lines[1].startswith("label: 2/6 features (") and "2 paid calls, $0.7500" in lines[1]
    assert lines[-1].startswith("label: 6/6 features") and "6 paid calls, $0.7500" in lines[-1]


def test_the_flow_run_has_a_progress_artifact(labdb, fake_llm, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    fake_llm.responder = lambda req: json.dumps({"explanation": "the tokens 'a' and 'b'"})
    assert main(["label", "--db", labdb, "--source", SOURCE, "--no-progress",
                 "--explainer", "openai:gpt-4o-mini"]) == 0
    (run_id,) = q(labdb, "SELECT run_id FROM runs")[0]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[run_id.lower()])))
    assert len(found) == 1 and found[0].type == "progress"
    assert float(found[0].data) == 100.0
    assert found[0].description.startswith("8 of 8 features, 6 paid calls, $")


@pytest.mark.filterwarnings("ignore:Artifact creation outside of a flow")  # outside a flow here
def test_a_prefect_server_gone_mid_run_holds_the_run_up_once_not_at_every_update():
    """The progress artifact is a courtesy: when the server stopped answering, Prefect's client
    retried each update for about a minute, and the flow waited that long every 5 s (a 38-feature
    run whose server died 12 s in had labelled 24 features 5 minutes later)."""
    import socket
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def hang_up() -> None:  # a server gone wrong: every connection closed at once
        while True:
            try:
                con, _ = listener.accept()
            except OSError:
                return
            connections.append(con)
            con.close()

    threading.Thread(target=hang_up, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    try:
        # one try per update (the client's minute of retries is what the run no longer waits for)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}), \
                Progress("label", total=4, unit="features", enabled=False) as bar:
            progress = LabelProgress(bar, Budget(None), total=4, artifact_key="label-gone")
            progress.refresh(force=True)
            assert connections, "the artifact was never asked for"
            tried = len(connections)
            progress.feature_done(chunk_key=0)
            progress.refresh(force=True)
            progress.chunk_written([0, 1, 2, 3])
            assert len(connections) == tried  # not asked again: the run goes on at its own pace
            assert bar.done == 4
    finally:
        listener.close()
