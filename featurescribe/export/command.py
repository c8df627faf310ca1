"""`featurescribe export` and `featurescribe report`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurescribe.errors import BadOption, FeaturescribeError
from featurescribe.export.common import MANIFEST, dumps, output_dir, output_file, write_text
from featurescribe.progress import Progress
from featurescribe.store.connection import DEFAULT_DB, open_db
from featurescribe.options import add_option_arguments, opt, options_class, options_from_args, required
from featurescribe.store.export_queries import count_features, count_sequences, export_sources

FORMATS = ("neuronpedia", "oai", "delphi", "parquet", "json")
DEFAULT_MAX_MB = 100.0


@options_class
class ExportOptions:
    """The options of `featurescribe export` and of `featurescribe.export(...)`."""

    format: str = required("neuronpedia: its bulk batch-N.jsonl.gz layout; oai: OpenAI neuron-explainer "
                           "records; delphi: explanation and score files; parquet: every table; json: one "
                           "feature_dictionary.json", choices=FORMATS)
    out: str = required("folder to write (replaced whole if it holds an earlier export)")
    source: str | None = opt(None, "export one source (default: all)", metavar="SOURCE_ID")
    creator_id: str = opt("featurescribe", "neuronpedia: the user id written as creatorId/authorId "
                                           "(default: featurescribe)")
    no_progress: bool = opt(False, "no progress bar or progress lines")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise BadOption(f"unknown export format {self.format!r}: use {', '.join(FORMATS)}")


@dataclass
class ExportResult:
    """What an export wrote: `n_features` features of `sources` as `format` into the folder `out`."""

    format: str
    out: str
    sources: list[str]
    n_features: int
    summary: dict[str, Any] = field(default_factory=dict)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    add_option_arguments(p, ExportOptions)


def _write_format(con, o: ExportOptions, sources: list[dict], all_sources: list[dict], tmp: Path, total: int):
    if o.format == "parquet":
        from featurescribe.export.tabular import table_names, write_parquet

        with Progress("export parquet", total=len(table_names(con)), unit="tables",
                      enabled=not o.no_progress) as prog:
            return write_parquet(con, sources, tmp, source_id=o.source, on_table=lambda: prog.advance(1))
    with Progress(f"export {o.format}", total=total, unit="features", enabled=not o.no_progress) as prog:
        tick = lambda: prog.advance(1)  # noqa: E731
        if o.format == "neuronpedia":
            from featurescribe.export.neuronpedia import write_neuronpedia

            return write_neuronpedia(con, sources, tmp, all_sources=all_sources, n_sequences=count_sequences(con),
                                     creator_id=o.creator_id, on_feature=tick)
        if o.format == "oai":
            from featurescribe.export.oai import write_oai

            return write_oai(con, sources, tmp, on_feature=tick)
        if o.format == "delphi":
            from featurescribe.export.delphi import write_delphi

            return write_delphi(con, sources, tmp, on_feature=tick)
        from featurescribe.export.tabular import write_json

        return write_json(con, sources, tmp, on_feature=tick)


def export_database(db: str | os.PathLike, o: ExportOptions) -> ExportResult:
    """Write the export the options describe (what `featurescribe export` and `featurescribe.export` run)."""
    con = open_db(db, read_only=True, create=False)
    try:
        sources = export_sources(con, o.source, db_label=f"database {db}")
        all_sources = export_sources(con, None, db_label=f"database {db}", finished=False)
        total = sum(count_features(con, s["source_id"]) for s in sources)
        with output_dir(o.out) as tmp:
            summary = _write_format(con, o, sources, all_sources, tmp, total)
            manifest = {"format": o.format, "sources": [s["source_id"] for s in sources], "summary": summary}
            write_text(tmp / MANIFEST, dumps(manifest) + "\n")
    finally:
        con.close()
    return ExportResult(o.format, str(o.out), [s["source_id"] for s in sources], total, summary)


def run_export(args: argparse.Namespace) -> int:
    r = export_database(args.db, options_from_args(ExportOptions, args))
    n = len(r.sources)
    print(f"exported {r.n_features} features from {n} source{'s' if n != 1 else ''} as {r.format} to {r.out}")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the HTML file to write")
    p.add_argument("--source", default=None, metavar="SOURCE_ID", help="one source (default: all)")
    p.add_argument("--examples", type=int, default=8, metavar="N",
                   help="top windows shown per feature (default: 8; random windows: half as many)")
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, metavar="MB",
                   help="refuse a report larger than this (default: 100; 0 for no limit): "
                        "`featurescribe browse` serves a database of any size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def run_report(args: argparse.Namespace) -> int:
    from featurescribe.export.report import SizeGuard, check_report_target, write_report

    if args.examples < 0:
        raise FeaturescribeError("--examples must be 0 or more")
    max_mb = getattr(args, "max_mb", DEFAULT_MAX_MB)  # flows build their own Namespace
    if max_mb < 0:
        raise FeaturescribeError("--max-mb must be 0 (no limit) or more")
    check_report_target(args.out)
    con = open_db(args.db, read_only=True, create=False)
    try:
        sources = export_sources(con, args.source, db_label=f"database {args.db}")
        total = sum(count_features(con, s["source_id"]) for s in sources)
        with output_file(args.out) as tmp:
            shown = not getattr(args, "no_progress", False)
            with Progress("report", total=total, unit="features", enabled=shown) as prog:
                guard = SizeGuard(int(max_mb * 1e6) if max_mb else None, total, args.db)
                n = write_report(con, sources, Path(tmp), db_name=Path(args.db).name,
                                 top_examples=args.examples, on_feature=lambda: prog.advance(1), guard=guard)
    finally:
        con.close()
    print(f"wrote a report of {n} features to {args.out}")
    return 0
