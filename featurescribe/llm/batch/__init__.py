"""Provider batch APIs (OpenAI Batch, Anthropic Message Batches) at the batch price.

`BatchRunner` (runner.py) runs a pipeline in collect passes with `BatchCollector`s
(collector.py) standing in for the LLM clients, submits what they record as provider batches
(openai_batch.py, anthropic_batch.py), and writes the answers into the response cache, so the
pipeline run normally afterwards finds every answer there. `featurescribe label --batch` uses it.
"""

from featurescribe.llm.batch.base import BatchItem, BatchPending, BatchState, ItemResult
from featurescribe.llm.batch.collector import BatchCollector, BatchSink
from featurescribe.llm.batch.runner import BatchOptions, BatchReport, BatchRunner, batch_discount

__all__ = [
    "BatchCollector",
    "BatchItem",
    "BatchOptions",
    "BatchPending",
    "BatchReport",
    "BatchRunner",
    "BatchSink",
    "BatchState",
    "ItemResult",
    "batch_discount",
]
