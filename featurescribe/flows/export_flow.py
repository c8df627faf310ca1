"""The export flow: feature dictionaries (and the HTML report) written from the database.

One task per format, run one after another (each reads the whole database read-only); each
writes `OUT/<format>/`, the report `OUT/report.html`. The writers are those of
`featurescribe export` / `featurescribe report`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from featurescribe.errors import FeaturescribeError
from featurescribe.flows.run_record import recorded_run

FORMATS = ("neuronpedia", "oai", "delphi", "parquet", "json")


def parse_formats(formats: str | list[str]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = [f.strip() for f in items if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise FeaturescribeError(f"unknown export format {bad[0]!r}: use {', '.join(FORMATS)}")
    return out


def check_export_targets(out: str, formats: str | list[str], report: bool) -> None:
    """Refuse, before any work, an OUT the flow could not write: a file, a folder under a file, or
    format folders and a report that are someone else's (the demo checks before its harvest)."""
    from featurescribe.export.common import check_output_dir
    from featurescribe.export.report import check_report_target

    root = Path(out)
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    what = "it" if existing == root else str(existing)
    if not existing.is_dir():
        raise FeaturescribeError(f"cannot export to {out}: {what} is a file, not a folder")
    if not os.access(existing, os.W_OK):  # a read-only mount, or a folder of another user's
        raise FeaturescribeError(f"cannot export to {out}: {what} cannot be written to")
    for fmt in parse_formats(formats):
        check_output_dir(root / fmt)
    if report:
        check_report_target(root / "report.html")


@task(name="export-format", cache_policy=NONE)
def export_format(db: str, fmt: str, out: str, source: str | None, no_progress: bool = False) -> str:
    from featurescribe.export.command import run_export

    rc = run_export(argparse.Namespace(db=db, format=fmt, out=out, source=source,
                                       creator_id="featurescribe", no_progress=no_progress))
    if rc:
        raise FeaturescribeError(f"export {fmt} failed (exit {rc})")
    return out


@task(name="export-report", cache_policy=NONE)
def export_report(db: str, out: str, source: str | None, no_progress: bool = False) -> str:
    from featurescribe.export.command import run_report

    rc = run_report(argparse.Namespace(db=db, out=out, source=source, examples=8, no_progress=no_progress))
    if rc:
        raise FeaturescribeError(f"report failed (exit {rc})")
    return out


@flow(name="export", log_prints=False)
def export_flow(db: str, out: str, formats: str | list[str] = "json", source: str | None = None,
                report: bool = True, no_progress: bool = False) -> dict:
    """Write each of `formats` to OUT/<format>/ and, with `report`, OUT/report.html."""
    fmts = parse_formats(formats)
    params = {"db": db, "out": out, "formats": fmts, "source": source, "report": report}
    with recorded_run(db, "export", params) as run:
        check_export_targets(out, fmts, report)
        Path(out).mkdir(parents=True, exist_ok=True)
        written = [export_format(db, f, str(Path(out) / f), source, no_progress) for f in fmts]
        if report:
            written.append(export_report(db, str(Path(out) / "report.html"), source, no_progress))
    return {"run_id": run.run_id, "written": written}
