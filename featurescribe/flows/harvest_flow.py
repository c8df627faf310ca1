"""The harvest flow: a model's activations at one site of one layer, into the database.

One task: the streaming harvest of `featurescribe harvest` (reader, model and writer threads in
one process, on the GPU when there is one). It resumes by itself: sequences already committed
are skipped, so a retried or re-run harvest adds only what is missing.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NONE

from featurescribe.flows.run_record import recorded_run


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
    from featurescribe.harvest.harvester import HarvestConfig, harvest

    r = harvest(HarvestConfig(**params))
    return {"source_id": r.source_id, "model_id": r.model_id, "width": r.width, "alive": r.alive,
            "n_tokens": r.n_tokens, "new_tokens": r.new_tokens, "n_activations": r.n_activations,
            "threshold": r.threshold, "seconds": round(r.seconds, 3)}


@flow(name="harvest")
def harvest_flow(db: str, model: str, layer: int, site: str | None = None, sae: str | None = None,
                 corpus: str = "builtin:stdlib", max_tokens: int | None = 100_000, ctx: int = 64,
                 batch_size: int | None = None, device: str = "auto", dtype: str | None = None,
                 threshold: str | None = None, source_id: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Harvest `model` at `layer`/`site` (or an SAE's latents) over `corpus`; returns counts."""
    params = dict(db=db, model=model, layer=layer, site=site, sae=sae, corpus=corpus,
                  max_tokens=max_tokens, ctx=ctx, batch_size=batch_size, device=device, dtype=dtype,
                  threshold=threshold, source_id=source_id, overwrite=overwrite, progress=progress)
    with recorded_run(db, "harvest", {k: v for k, v in params.items() if k != "progress"}) as run:
        result = harvest_task(params)
    return {"run_id": run.run_id, **result}
