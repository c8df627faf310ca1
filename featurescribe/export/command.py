"""`featurescribe export` and `featurescribe report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from featurescribe.errors import FeaturescribeError
from featurescribe.export.common import MANIFEST, dumps, output_dir, output_file, write_text
from featurescribe.progress import Progress
from featurescribe.store.connection import DEFAULT_DB, open_db
from featurescribe.store.export_queries import count_features, export_sources

FORMATS = ("neuronpedia", "oai", "delphi", "parquet", "json")
DEFAULT_MAX_MB = 100.0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="neuronpedia: its bulk batch-N.jsonl.gz layout; oai: OpenAI neuron-explainer "
                        "records; delphi: explanation and score files; parquet: every table; "
                        "json: one feature_dictionary.json")
    p.add_argument("--out", required=True, help="folder to write (replaced whole if it holds an earlier export)")
    p.add_argument("--source", default=None, metavar="SOURCE_ID", help="export one source (default: all)")
    p.add_argument("--creator-id", default="featurescribe",
                   help="neuronpedia: the user id written as creatorId/authorId (default: featurescribe)")


def run_export(args: argparse.Namespace) -> int:
    con = open_db(args.db, read_only=True, create=False)
    try:
        sources = export_sources(con, args.source, db_label=f"database {args.db}")
        all_sources = export_sources(con, None, db_label=f"database {args.db}")
        total = sum(count_features(con, s["source_id"]) for s in sources)
        with output_dir(args.out) as tmp:
            if args.format == "parquet":
                from featurescribe.export.tabular import table_names, write_parquet

                with Progress("export parquet", total=len(table_names(con)), unit="tables") as prog:
                    summary = write_parquet(con, sources, tmp, source_id=args.source,
                                            on_table=lambda: prog.advance(1))
            else:
                with Progress(f"export {args.format}", total=total, unit="features") as prog:
                    tick = lambda: prog.advance(1)  # noqa: E731
                    if args.format == "neuronpedia":
                        from featurescribe.export.neuronpedia import write_neuronpedia

                        n_seq = int(con.execute("SELECT count(*) FROM sequences").fetchone()[0])
                        summary = write_neuronpedia(con, sources, tmp, all_sources=all_sources,
                                                    n_sequences=n_seq, creator_id=args.creator_id,
                                                    on_feature=tick)
                    elif args.format == "oai":
                        from featurescribe.export.oai import write_oai

                        summary = write_oai(con, sources, tmp, on_feature=tick)
                    elif args.format == "delphi":
                        from featurescribe.export.delphi import write_delphi

                        summary = write_delphi(con, sources, tmp, on_feature=tick)
                    else:
                        from featurescribe.export.tabular import write_json

                        summary = write_json(con, sources, tmp, on_feature=tick)
            manifest = {"format": args.format, "sources": [s["source_id"] for s in sources], "summary": summary}
            write_text(tmp / MANIFEST, dumps(manifest) + "\n")
    finally:
        con.close()
    print(f"exported {total} features from {len(sources)} source{'s' if len(sources) != 1 else ''} "
          f"as {args.format} to {args.out}")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--source", default=None, metavar="SOURCE_ID", help="one source (default: all)")
    p.add_argument("--examples", type=int, default=8, metavar="N",
                   help="top windows shown per feature (default: 8; random windows: half as many)")
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, metavar="MB",
                   help="refuse a report larger than this (default: 100; 0 for no limit): "
                        "`featurescribe browse` serves a database of any size")


def run_report(args: argparse.Namespace) -> int:
    from featurescribe.export.report import SizeGuard, write_report

    if args.examples < 0:
        raise FeaturescribeError("--examples must be 0 or more")
    max_mb = getattr(args, "max_mb", DEFAULT_MAX_MB)  # flows build their own Namespace
    if max_mb < 0:
        raise FeaturescribeError("--max-mb must be 0 (no limit) or more")
    con = open_db(args.db, read_only=True, create=False)
    try:
        sources = export_sources(con, args.source, db_label=f"database {args.db}")
        total = sum(count_features(con, s["source_id"]) for s in sources)
        with output_file(args.out) as tmp:
            with Progress("report", total=total, unit="features") as prog:
                guard = SizeGuard(int(max_mb * 1e6) if max_mb else None, total, args.db)
                n = write_report(con, sources, Path(tmp), db_name=Path(args.db).name,
                                 top_examples=args.examples, on_feature=lambda: prog.advance(1), guard=guard)
    finally:
        con.close()
    print(f"wrote a report of {n} features to {args.out}")
    return 0
