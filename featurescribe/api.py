"""The Python API: the operations of the `featurescribe` command as functions.

    import featurescribe as fs
    fs.harvest("fs.duckdb", model="smollm2-135m", layer="6", max_tokens=20_000)
    fs.label("fs.duckdb", source="6-mlp", features="0:32")
    db = fs.open("fs.duckdb")
    db.labels().to_pandas()

The keyword arguments of `harvest`, `label` and `export` are the fields of `HarvestOptions`,
`LabelOptions` and `ExportOptions`, the same declarations the command line parses, so an option
has one name, one default and one check everywhere (`--max-tokens` is `max_tokens=`).
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Any, Iterator

from featurescribe.database import Database
from featurescribe.export.command import ExportOptions, ExportResult
from featurescribe.flows.label_options import LabelOptions
from featurescribe.flows.label_run import LabelSummary
from featurescribe.harvest.harvester import HarvestResult
from featurescribe.harvest.options import HarvestOptions
from featurescribe.options import options_from_kwargs, options_signature
from featurescribe.store.connection import DEFAULT_DB

PathLike = str | os.PathLike


def open(path: PathLike = DEFAULT_DB, *, read_only: bool = True) -> Database:  # noqa: A001 - the API's name
    """A handle on a database file; `NoDatabase` when there is none at `path`."""
    return Database(path, read_only=read_only)


@contextmanager
def _prefect() -> Iterator[None]:
    """Prefect configured for a flow run; a configured Prefect server that stopped answering during
    it raises `PrefectServerGone` (what finished is in the database) instead of httpx's error."""
    from featurescribe.flows.prefect_env import configure_prefect, prefect_server_gone

    configure_prefect()
    try:
        yield
    except Exception as err:
        gone = prefect_server_gone(err)
        if gone is None:
            raise
        raise gone from err


def harvest(db: PathLike = DEFAULT_DB, **options: Any) -> list[HarvestResult]:
    """Run a model over a corpus and store its activations: one `HarvestResult` per source.

    `model` is a name (`smollm2-135m`), a folder, or a loaded transformers model (with
    `tokenizer=`); `sae` is a folder, a SAELens `SAE` object, or a list of them. The other options
    are those of `featurescribe harvest` (`HarvestOptions`)."""
    from featurescribe.harvest.command import run_harvest

    with _prefect():
        return run_harvest(str(db), options_from_kwargs(HarvestOptions, "harvest", options))


def label(db: PathLike = DEFAULT_DB, **options: Any) -> LabelSummary | None:
    """Sample, explain and score the features of a source (`featurescribe label`; the options are
    `LabelOptions`'s, `source=` required). Returns the run's `LabelSummary`."""
    from featurescribe.flows.label_command import run_label

    with _prefect():
        return run_label(str(db), options_from_kwargs(LabelOptions, "label", options))


def export(db: PathLike = DEFAULT_DB, **options: Any) -> ExportResult:
    """Write feature dictionaries (`featurescribe export`; the options are `ExportOptions`'s:
    `format=` and `out=` required)."""
    from featurescribe.export.command import export_database

    return export_database(str(db), options_from_kwargs(ExportOptions, "export", options))


def _signature(cls: type) -> inspect.Signature:
    """`(db=DEFAULT_DB, *, <one keyword per field of cls>)`: what help() and editors show."""
    db = inspect.Parameter("db", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULT_DB, annotation=PathLike)
    return inspect.Signature([db, *options_signature(cls).parameters.values()])


harvest.__signature__ = _signature(HarvestOptions)  # type: ignore[attr-defined]
label.__signature__ = _signature(LabelOptions)  # type: ignore[attr-defined]
export.__signature__ = _signature(ExportOptions)  # type: ignore[attr-defined]
