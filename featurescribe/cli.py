"""The `featurescribe` command.

Each subcommand lives in a module with `add_arguments(parser)` and `run(args) -> int`; this file
only registers them, and turns user errors into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from featurescribe.errors import FeaturescribeError
from featurescribe.store.connection import DEFAULT_DB

# (name, module, one-line help). A command is listed here when it works.
COMMANDS: list[tuple[str, str, str]] = [
    ("init", "featurescribe.store.commands", "create an empty database with the schema"),
    ("sql", "featurescribe.store.commands", "run SQL against a database and print the result"),
    ("harvest", "featurescribe.harvest.command",
     "run a model over a corpus and store one layer's activations (neurons or SAE latents)"),
    ("label", "featurescribe.flows.label_command",
     "sample, explain and score the features of a source"),
    ("export", "featurescribe.export.command",
     "write feature dictionaries: neuronpedia, oai, delphi, parquet or json"),
    ("report", "featurescribe.export.command", "write a self-contained HTML feature browser"),
    ("demo", "featurescribe.flows.demo",
     "the whole pipeline on a small model, offline: harvest, label, score, export"),
    ("embed", "featurescribe.semantic.commands", "embed every label for semantic search (offline MiniLM by default)"),
    ("search", "featurescribe.semantic.commands", "find the features whose best label is closest in meaning to a query"),
    ("browse", "featurescribe.web.command", "a local web app to browse, filter and search features (read-only)"),
    ("serve", "featurescribe.flows.serve",
     "serve the label flow as a Prefect deployment on a cron schedule"),
]


def _module_for(name: str, module: str):
    mod = importlib.import_module(module)
    # a module may hold several commands: add_<name>_arguments / run_<name>
    add = getattr(mod, f"add_{name}_arguments", None) or getattr(mod, "add_arguments")
    run = getattr(mod, f"run_{name}", None) or getattr(mod, "run")
    return add, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurescribe",
        description="Label the features of a neural network with LLM explanations, scored by simulation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        add, run = _module_for(name, module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except FeaturescribeError as err:
        print(f"featurescribe: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("featurescribe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
