"""The `featurescribe` command.

Each subcommand lives in a module with an add-arguments and a run function; `command_table`
lists them, and `main` turns user errors into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from featurescribe.errors import FeaturescribeError, damaged_database, disk_full
from featurescribe.interrupts import as_interruption, exit_now, handling_signals
from featurescribe.statuses import ExitStatus


RESUMES = "what finished is kept, run the same command again to go on"


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, shown by `featurescribe --help` and as the command's description
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    on_signal: str = RESUMES  # what the line for Ctrl-C or SIGTERM says after "interrupted (SIGNAL); "


def command_table() -> list[Command]:
    """Every command, in help order. Adding one: its module with `add_arguments(parser)` and
    `run(args) -> int`, and one line here."""
    from featurescribe.export import command as export
    from featurescribe.flows import demo, label_command, serve
    from featurescribe.harvest import command as harvest
    from featurescribe.semantic import commands as semantic
    from featurescribe.steer import command as steer
    from featurescribe.store import commands as store
    from featurescribe.web import command as web

    return [
        Command("init", "create an empty database with the schema", store.add_init_arguments, store.run_init),
        Command("sql", "run SQL against a database and print the result", store.add_sql_arguments, store.run_sql,
                on_signal="the query stopped; with --write, nothing it changed is kept"),
        Command("harvest", "run a model over a corpus once and store the activations of its layers, sites and SAEs",
                harvest.add_arguments, harvest.run),
        Command("label", "sample, explain and score the features of a source",
                label_command.add_arguments, label_command.run),
        Command("steer", "continue prompts with one feature steered (clamped or added), beside the unsteered text",
                steer.add_arguments, steer.run, on_signal="nothing was written"),
        Command("export", "write feature dictionaries: neuronpedia, oai, delphi, parquet or json",
                export.add_export_arguments, export.run_export),
        Command("report", "write a self-contained HTML feature browser",
                export.add_report_arguments, export.run_report),
        Command("embed", "embed every label for semantic search (offline MiniLM by default)",
                semantic.add_embed_arguments, semantic.run_embed),
        Command("search", "find the features whose best label is closest in meaning to a query",
                semantic.add_search_arguments, semantic.run_search),
        Command("browse", "a local web app to browse, filter and search features (read-only)",
                web.add_browse_arguments, web.run_browse, on_signal="the server stopped"),
        Command("demo", "the whole pipeline on a small model, offline: harvest, label, score, export",
                demo.add_demo_arguments, demo.run_demo),
        Command("serve", "serve the label flow as a Prefect deployment on a cron schedule",
                serve.add_serve_arguments, serve.run_serve,
                on_signal="no longer serving; runs already finished are kept, run the same command again to serve"),
    ]


def _add_lock_timeout(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--lock-timeout", metavar="SECONDS", default=default,
                   help="how long to wait for a database another process is using before giving up "
                        "(default: $FEATURESCRIBE_LOCK_TIMEOUT, else 5); a run already under way waits "
                        "at least 120 s for its own writes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurescribe",
        description="Label the features of a neural network with LLM explanations, scored by simulation.",
    )
    _add_lock_timeout(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in command_table():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        _add_lock_timeout(p, argparse.SUPPRESS)  # given after the command, it wins
        p.set_defaults(_run=cmd.run, _on_signal=cmd.on_signal)
    return parser


def _interrupted(signum: int, as_program: bool, what_now: str = RESUMES) -> int:
    status = ExitStatus.TERMINATED if signum == signal.SIGTERM else ExitStatus.INTERRUPTED
    print(f"featurescribe: interrupted ({signal.Signals(signum).name}); {what_now}", file=sys.stderr)
    if as_program:  # the process itself (not a caller's `main([...])`): end it now
        exit_now(status)
    return status


def main(argv: list[str] | None = None) -> int:
    from featurescribe.flows.prefect_env import configure_prefect, prefect_server_gone, quiet_reported_errors

    configure_prefect()  # before any command imports Prefect
    quiet_reported_errors()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return ExitStatus.USAGE
    try:
        _check_db_path(getattr(args, "db", None))
        _export_lock_timeout(args.lock_timeout)
        with handling_signals():
            return int(args._run(args) or 0)
    except BaseException as err:
        err = as_interruption(err)  # whatever a signal broke on its way in is the signal
        if isinstance(err, KeyboardInterrupt):
            return _interrupted(getattr(err, "signum", signal.SIGINT), as_program=argv is None,
                                what_now=getattr(args, "_on_signal", RESUMES))
        if isinstance(err, FeaturescribeError):
            print(f"featurescribe: error: {err}", file=sys.stderr)
            return err.exit_code
        known = disk_full(err) or damaged_database(err, getattr(args, "db", None))
        if known is not None:
            print(f"featurescribe: error: {known}", file=sys.stderr)
            return known.exit_code
        gone = prefect_server_gone(err)
        if gone is not None:
            print(f"featurescribe: error: {gone}", file=sys.stderr)
            if argv is None:  # Prefect's events for that server would be drained for ever at exit
                exit_now(gone.exit_code)
            return gone.exit_code
        if isinstance(err, BrokenPipeError):
            return ExitStatus.OK
        raise


def _check_db_path(db: str | None) -> None:
    """Every command's `--db` names a file: an empty path or DuckDB's `:memory:` would run the whole
    command on a database that vanishes when it ends."""
    from featurescribe.errors import BadOption

    if db is not None and (not str(db).strip() or str(db) == ":memory:"):
        raise BadOption(f"--db {db!r}: give the path of a database file, e.g. --db features.duckdb")


def _export_lock_timeout(text: str | None) -> None:
    """`--lock-timeout` reaches every opening of the database (and processes started from here)
    through the environment variable that `store.connection.lock_timeout` reads."""
    import os

    from featurescribe.store.connection import LOCK_TIMEOUT_ENV, parse_lock_timeout

    if text is not None:
        os.environ[LOCK_TIMEOUT_ENV] = repr(parse_lock_timeout(text))


if __name__ == "__main__":
    raise SystemExit(main())
