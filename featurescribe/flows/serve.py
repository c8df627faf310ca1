"""`featurescribe serve --cron "0 3 * * *" [label options]`: the label flow on a schedule.

It builds a Prefect deployment of the label flow with the given options as its parameters and a
cron schedule, and serves it (`prefect.serve`): this process waits for scheduled (or manually
started) runs and runs each one, one at a time, in a subprocess. Each run labels what is not
labelled yet (features a harvest added since, features a killed or budget-stopped run left), so
a nightly schedule keeps a growing database labelled.

    featurescribe serve --cron "0 3 * * *" --db /data/f.duckdb --source 6-mlp --features alive \\
        --explainer openai:gpt-4o-mini --simulator openai:gpt-4o-mini --budget-usd 5

With no `PREFECT_API_URL` the deployment lives in Prefect's ephemeral server for as long as this
process runs; with one, it is registered on that server (its UI shows it and can start runs).
`--dry-run` prints the deployment and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from featurescribe.errors import FeaturescribeError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from featurescribe.flows import label_command

    p.add_argument("--cron", required=True, help='when to run, a cron expression, e.g. "0 3 * * *" (03:00 daily)')
    p.add_argument("--timezone", default="UTC", help="the cron's time zone (default: UTC)")
    p.add_argument("--name", default=None, help="the deployment's name (default: label-SOURCE)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the deployment (flow, schedule, parameters) and exit without serving")
    label_command.add_arguments(p)


def _check_cron(cron: str, tz: str) -> None:
    from pydantic import ValidationError

    from featurescribe.flows.prefect_env import configure_prefect

    configure_prefect()
    from prefect.client.schemas.schedules import CronSchedule

    bad = f"bad --cron {cron!r}: five fields, e.g. \"0 3 * * *\" (03:00 daily)"
    if not cron.strip().startswith("@") and len(cron.split()) != 5:  # croniter also takes 6 and 7 fields
        raise FeaturescribeError(bad)
    try:
        CronSchedule(cron=cron, timezone=tz)
    except ValidationError as err:
        field = err.errors()[0]["loc"][0] if err.errors() else "cron"
        if field == "timezone":
            raise FeaturescribeError(f"unknown --timezone {tz!r} (an IANA name: UTC, Europe/Paris, ...)") from None
        raise FeaturescribeError(f"bad --cron {cron!r}: a field is out of range or not understood (minute 0-59, "
                                 "hour 0-23, day 1-31, month 1-12, weekday 0-6; e.g. \"0 3 * * *\")") from None
    _check_cron_fires(cron, tz)


def _check_cron_fires(cron: str, tz: str) -> None:
    """A cron of days that do not exist ("0 3 31 2 *", February 31) is valid to croniter, but
    Prefect's scheduler finds no next run: `serve` would wait forever and run nothing."""
    import asyncio

    from prefect.server.schemas.schedules import CronSchedule as ServerCron  # what the scheduler runs

    try:
        asyncio.run(ServerCron(cron=cron, timezone=tz).get_dates(n=1))
    except ValueError:  # croniter's CroniterBadDateError
        raise FeaturescribeError(f"bad --cron {cron!r}: it names no date that exists (e.g. February 30), "
                                 "so it would never run") from None


def build_deployment(args: argparse.Namespace):
    """The RunnerDeployment `serve` would serve (a user error raises FeaturescribeError)."""
    from featurescribe.flows.label_flow import label_flow, preflight
    from featurescribe.flows.label_options import from_args

    _check_cron(args.cron, args.timezone)
    db = os.path.abspath(args.db)  # runs start in other processes
    options = from_args(args).replace(no_progress=True)  # no terminal to draw on
    preflight(db, options)
    from prefect.exceptions import InvalidNameError
    from prefect.schedules import Cron

    name = args.name or f"label-{args.source}"
    try:
        return label_flow.to_deployment(
            name=name, schedules=[Cron(args.cron, timezone=args.timezone)],
            parameters={"db": db, **dataclasses.asdict(options)},
            description=f"label new or unlabelled features of {args.source} in {db}",
            tags=["featurescribe", "label"])
    except InvalidNameError as err:
        raise FeaturescribeError(f"bad --name {name!r}: {err}") from None


def describe(deployment) -> dict[str, Any]:
    return {"deployment": f"{deployment.flow_name}/{deployment.name}",
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone}
                          for s in deployment.schedules],
            "parameters": deployment.parameters}


def run_serve(args: argparse.Namespace) -> int:
    # a long-running server: Prefect's INFO lines (runs started, finished) are its log, and the
    # served runs (its subprocesses) send theirs to the UI
    if not args.dry_run:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    from featurescribe.flows.prefect_env import api_url, check_prefect_server

    dep = build_deployment(args)
    info = describe(dep)
    if args.dry_run:
        print(json.dumps(info, indent=2, default=str))
        return 0
    check_prefect_server()
    where = api_url() or "Prefect's ephemeral server (set PREFECT_API_URL to register it on a server)"
    print(f"serving {info['deployment']} on {args.cron!r} ({args.timezone}) via {where}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    serve_until_signal(dep)
    return 0


def serve_until_signal(dep) -> None:
    """`prefect.serve` (one run at a time: one DuckDB writer), ended by SIGINT or SIGTERM with
    `Interrupted`: prefect.serve swallows Ctrl-C and exits 0 on SIGTERM, which a scheduler would
    read as a clean end."""
    import signal
    import warnings

    from prefect import serve

    from featurescribe.interrupts import Interrupted, received

    # Prefect's own SIGTERM handler calls the async Runner.stop without awaiting it (the runner
    # stops anyway): its warning would be three lines of noise before ours
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
    try:
        serve(dep, limit=1, print_starting_message=False)
    except SystemExit as ended:  # the runner's SIGTERM handler: sys.exit(0) after stopping
        if ended.code not in (0, None):
            raise
        raise Interrupted(signal.SIGTERM) from None
    if received() is not None:
        raise Interrupted(received())
