"""The harvest flow: a model's activations at its sites and SAEs, into the database.

One task: the streaming harvest of `featurescribe harvest` (reader, model and writer threads in
one process, on the GPU when there is one). It resumes by itself: sequences already committed
are skipped, so a retried or re-run harvest adds only what is missing.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NONE

from featurescribe.flows.run_record import recorded_run
from featurescribe.interrupts import ours_in_flow


def _transient(task, task_run, state) -> bool:
    """Retry a harvest only for failures that are not the user's or a full disk's (those end the
    run at once)."""
    from featurescribe.errors import beyond_retrying

    try:
        state.result()
    except Exception as err:
        return not beyond_retrying(err)
    return False


@task(name="harvest", cache_policy=NONE, retries=1, retry_delay_seconds=5, retry_condition_fn=_transient)
def harvest_task(params: dict) -> dict:
    from featurescribe.harvest.harvester import HarvestConfig, harvest_all

    results = [{"source_id": r.source_id, "model_id": r.model_id, "width": r.width, "alive": r.alive,
                "n_tokens": r.n_tokens, "new_tokens": r.new_tokens, "n_activations": r.n_activations,
                "threshold": r.threshold, "seconds": round(r.seconds, 3)} for r in harvest_all(HarvestConfig(**params))]
    return {**results[0], "sources": results}


@flow(name="harvest")
def harvest_flow(db: str, model: str, layer: int | str | None = None, site: str | None = None,
                 sae: str | list[str] | None = None,
                 corpus: str = "builtin:stdlib", max_tokens: int | None = 100_000, ctx: int = 64,
                 batch_size: int | None = None, device: str = "auto", dtype: str | None = None,
                 threshold: str | None = None, source_id: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Harvest `model` at `layer` x `site` (and SAEs) over `corpus` in one pass; returns the first
    source's counts, and every source's under `sources`. The parameters are `HarvestConfig`'s."""
    params = dict(locals())
    with recorded_run(db, "harvest", {k: v for k, v in params.items() if k != "progress"}) as run:
        result = harvest_task(params)
    return {"run_id": run.run_id, **result}


@task(name="harvest-shard", cache_policy=NONE, retries=1, retry_delay_seconds=5, retry_condition_fn=_transient)
def harvest_shard_task(plan: dict, index: int) -> dict:
    from featurescribe.harvest.shards import run_shard

    return run_shard(plan, index)


@flow(name="harvest-shards")
def harvest_shards_flow(plan: dict, task_runner: str = "thread", workers: int = 2,
                        dask_address: str | None = None) -> list:
    """Run the shards of a planned harvest (featurescribe/harvest/shards.py) on the task runner, then merge."""
    import time
    from contextlib import ExitStack

    from featurescribe.flows.runners import make_task_runner, workers_see_api
    from featurescribe.harvest.shards import merge

    db = plan["params"]["db"]
    t0 = time.monotonic()
    # our SIGTERM handler, not Prefect's: it tells the shards' threads to stop (stop_if_received)
    with ours_in_flow(), recorded_run(db, "harvest", {"shards": plan["shards"], "task_runner": task_runner,
                                      **{k: v for k, v in plan["params"].items() if k != "progress"}}):
        with ExitStack() as stack:
            if task_runner == "dask":
                stack.enter_context(workers_see_api())
            runner = stack.enter_context(make_task_runner(task_runner, threads=plan["shards"], workers=workers,
                                                          address=dask_address))
            todo = [] if plan["complete"] else range(plan["shards"])
            futures = [runner.submit(harvest_shard_task.with_options(task_run_name=f"harvest-shard-{i}"),
                                     parameters={"plan": plan, "index": i}) for i in todo]
            done = [f.result() for f in futures]
        results = merge(plan)
    for r in results:
        r.new_tokens = sum(d["new_tokens"] for d in done)
        r.new_sequences = r.n_sequences if r.new_tokens else 0
        r.seconds = time.monotonic() - t0
        r.extra = {"shards": done}
    return results
