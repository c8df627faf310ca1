"""The pipeline flow: harvest -> label -> export, as subflows of one flow run.

    pipeline_flow(db="f.duckdb", model="smollm2-135m", layer=6, features="alive",
                  explainer="openai:gpt-4o-mini", simulator="openai:gpt-4o-mini", out="out/f")

Each stage is its own flow (its own row in `runs` and run in Prefect, under the pipeline's), so a
re-run resumes where the last one stopped: the harvest skips the sequences it has, the label flow
the features that have a label, and the export is rewritten whole.
"""

from __future__ import annotations

from prefect import flow

from featurescribe.flows.export_flow import export_flow
from featurescribe.flows.harvest_flow import harvest_flow
from featurescribe.flows.label_options import DEFAULT_CHUNK_SIZE
from featurescribe.flows.label_flow import labelled_by_flow
from featurescribe.flows.run_record import recorded_run


@flow(name="pipeline")
def pipeline_flow(db: str, model: str, layer: int, site: str | None = None, sae: str | None = None,
                  corpus: str = "builtin:stdlib", max_tokens: int | None = 100_000, ctx: int = 64,
                  device: str = "auto", features: str = "alive", explainer: str = "baseline:tokens",
                  simulator: str = "lexical", scorers: str = "simulation", candidates: int = 1,
                  concurrency: int = 16, budget_usd: float | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, task_runner: str = "thread", workers: int = 2,
                  out: str | None = None, formats: str = "json", no_progress: bool = False) -> dict:
    """Harvest `model` at `layer`, label `features` of the new source, export to `out` (if given)."""
    params = {k: v for k, v in locals().items()}
    with recorded_run(db, "pipeline", params) as run:
        h = harvest_flow(db=db, model=model, layer=layer, site=site, sae=sae, corpus=corpus,
                         max_tokens=max_tokens, ctx=ctx, device=device, progress=not no_progress)
        s = labelled_by_flow(db=db, source=h["source_id"], features=features, explainer=explainer,
                             simulator=simulator, scorers=scorers, candidates=candidates,
                             concurrency=concurrency, budget_usd=budget_usd, chunk_size=chunk_size,
                             task_runner=task_runner, workers=workers, no_progress=no_progress)
        exported = None
        if out:
            exported = export_flow(db=db, out=out, formats=formats, report=True, no_progress=no_progress)["written"]
    return {"run_id": run.run_id, "source_id": h["source_id"], "labelled": len(s.labelled),
            "failed": len(s.failed), "mean_score": s.mean_score, "exported": exported}
