"""Prefect's settings as featurescribe uses them, applied before Prefect is imported.

- Analytics off (`PREFECT_SERVER_ANALYTICS_ENABLED=false`) and Prefect's console logs at
  WARNING (`PREFECT_LOGGING_LEVEL`), unless the user set them.
- No `PREFECT_API_URL`: Prefect's ephemeral mode, a temporary server started in the background
  for the length of the command, its SQLite database in `PREFECT_HOME` (Prefect's default,
  `~/.prefect`; `make` points it into `.venv/prefect-home`).
- `PREFECT_API_URL` set (or set in the active Prefect profile): every flow run is recorded on that
  server, and provider limits become Prefect global concurrency limits (see `global_limits.py`).
  Set in the environment, Prefect's client retries a request twice (`PREFECT_CLIENT_MAX_RETRIES`),
  unless the user set it. A server that stops answering mid-run is one line at the end
  (`prefect_server_gone`), not Prefect's lines about every event it could not send.
"""

from __future__ import annotations

import logging
import os
import re
import sys


def configure_prefect() -> None:
    """Set featurescribe's defaults for Prefect's settings; call before importing prefect."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's own INFO lines (flow run began, task run finished, temporary server started)
    # would bury the progress bars and summaries; PREFECT_LOGGING_LEVEL=INFO brings them back.
    # Warnings and errors still show, and the Prefect UI shows every run and task run.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # the ephemeral server's start-up check waits this long before giving up (default 20 s,
    # too short on a busy 2-core machine)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if os.environ.get("PREFECT_API_URL"):
        # Prefect's client tries a request 6 times over about 80 s; a configured server that went
        # away mid-run held the run that long at the progress artifact and again at the run's end.
        # Two retries (2 s and 4 s apart) still ride out a server's restart or a busy moment.
        os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")


def api_url() -> str | None:
    """The URL of a configured Prefect server, or None in ephemeral mode."""
    configure_prefect()
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def check_prefect_server() -> None:
    """Refuse a configured Prefect server that does not answer, before any work: Prefect itself
    finds out only when the first flow run starts, with a traceback (and, for the demo, after the
    checks of its options)."""
    url = api_url()
    if url is None:
        return
    from prefect.client.orchestration import get_client

    from featurescribe.errors import PrefectUnreachable, first_error_line

    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise PrefectUnreachable(
            f"the Prefect server at {url} is unreachable ({first_error_line(failure)}); start it "
            "(prefect server start), or unset PREFECT_API_URL to run on a temporary server of this command's own")


def prefect_server_gone(err: BaseException):
    """A `PrefectServerGone` for an error of Prefect's client on a request to the configured server
    (no connection, a connection cut) raised while a flow ran, else None. Only a configured server:
    the command's own temporary one ends with the command."""
    from featurescribe.errors import PrefectServerGone, _chain, first_error_line

    httpx = sys.modules.get("httpx")
    url = api_url() if httpx is not None and "prefect" in sys.modules else None
    for seen in _chain(err) if url else ():
        if isinstance(seen, httpx.TransportError) and _request_url(seen).startswith(url.rstrip("/")):
            return PrefectServerGone(
                f"the Prefect server at {url} stopped answering during the run ({first_error_line(seen)}), so "
                f"the flow run's end is not recorded there; what finished is kept in the database, run the same "
                "command again to go on")
    return None


def _request_url(err) -> str:
    try:
        return str(err.request.url)
    except RuntimeError:  # httpx raises it for an error made without its request
        return ""


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# Prefect's events go to the server over a websocket, from a background service that reports every
# event it could not send, about every 7 s while the server is away
# (as do the global-limit slots it could not take or renew, and the drain of those services at exit)
_EVENT_LOGGERS = ("prefect.events.clients", "prefect._internal.concurrency", "EventsWorker", "APILogWorker")
_LOST_EVENT_LINES = ("Unable to connect to 'ws", "Service 'EventsWorker' failed to process item",
                     "Service 'ConcurrencySlotAcquisitionWithLeaseService' failed to process item",
                     "Still processing items")
# a failed task's last line names its exception without carrying it
_FAILED_TASK = re.compile(r"Finished in state Failed\('Task run encountered an exception (\w+): ")


class _ReportedErrorLines(logging.Filter):
    """Prefect's ERROR lines (with tracebacks, one per flow and task the exception passes through)
    about an exception the command reports itself in one `featurescribe: error:` line: a user's
    mistake, a full disk or a damaged database. Dozens of lines would bury that one; the runs stay
    Failed on the server."""

    def filter(self, record: logging.LogRecord) -> bool:
        from featurescribe.errors import beyond_retrying

        if not record.name.startswith(RUN_LOGGERS):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            return not beyond_retrying(record.exc_info[1])
        failed = _FAILED_TASK.match(record.getMessage())
        return failed is None or not _names_reported_error(failed.group(1), record.getMessage())


def _names_reported_error(class_name: str, message: str) -> bool:
    from featurescribe.errors import FeaturescribeError, damaged_database, disk_full

    def names(cls: type) -> set[str]:
        return {cls.__name__}.union(*(names(sub) for sub in cls.__subclasses__()))

    reported = RuntimeError(message)
    return (class_name in names(FeaturescribeError) or disk_full(reported) is not None
            or damaged_database(reported, None) is not None)


class _OnTheConsole(logging.Filter):
    """On Prefect's run loggers, whose own handler sends every record to the Prefect server: puts
    `_ReportedErrorLines` and the interruption's `PrefectCrashLines` (a signal that Prefect's own
    handler took, in a task, never reaches ours) on the console handler, which Prefect sets up on
    the root logger when it is first used, as the first record goes by. It lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        from featurescribe.interrupts import PrefectCrashLines

        for handler in logging.getLogger().handlers:
            for kind in (_ReportedErrorLines, PrefectCrashLines):
                if not any(isinstance(f, kind) for f in handler.filters):
                    handler.addFilter(kind())
        return True


class _ServerGoneLines(logging.Filter):
    """Prefect's lines about a configured server that stopped answering mid-run: the events it
    could not send (a WARNING and an ERROR every few seconds until the command ends) and the flow's
    ConnectError with its traceback. The command says it in one line at the end (`prefect_server_gone`).
    A logger's filter: the record reaches neither the console nor Prefect's API handler (which would
    only fail to send it to that server, with a line of its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_EVENT_LOGGERS):
            return not record.getMessage().startswith(_LOST_EVENT_LINES)
        error = record.exc_info[1] if record.exc_info else None
        return error is None or prefect_server_gone(error) is None


def quiet_reported_errors() -> None:
    """For the command line, whose `main` prints such errors in one line (once per process)."""
    for name, kinds in [*((n, (_OnTheConsole, _ServerGoneLines)) for n in RUN_LOGGERS),
                        *((n, (_ServerGoneLines,)) for n in _EVENT_LOGGERS)]:
        logger = logging.getLogger(name)
        for kind in kinds:
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
