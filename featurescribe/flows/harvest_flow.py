"""The harvest flow: a model's activations at one site of one layer, into the database.

One task: the streaming harvest of `featurescribe harvest` (reader, model and writer threads in
one process, on the GPU when there is one). It resumes by itself: sequences already committed
are skipped, so a retried or re-run harvest adds only what is missing.
"""

from __future__ import annotations

from featurescribe.flows.prefect_env import configure_prefect

configure_prefect()

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from featurescribe.flows.runs import recorded_run  # noqa: E402


def _transient(task, task_run, state) -> bool:
    """Retry a harvest only for failures that are not the user's (those end the run at once)."""
    from featurescribe.errors import FeaturescribeError

    try:
        state.result()
    except FeaturescribeError:
        return False
    except Exception:
        return True
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
    source's counts, and every source's under `sources`."""
    params = dict(db=db, model=model, layer=layer, site=site, sae=sae, corpus=corpus,
                  max_tokens=max_tokens, ctx=ctx, batch_size=batch_size, device=device, dtype=dtype,
                  threshold=threshold, source_id=source_id, overwrite=overwrite, progress=progress)
    with recorded_run(db, "harvest", {k: v for k, v in params.items() if k != "progress"}) as run:
        result = harvest_task(params)
    return {"run_id": run.run_id, **result}
