"""Prefect's settings as featurescribe uses them, applied before Prefect is imported.

- Analytics off (`PREFECT_SERVER_ANALYTICS_ENABLED=false`) and Prefect's console logs at
  WARNING (`PREFECT_LOGGING_LEVEL`), unless the user set them.
- No `PREFECT_API_URL`: Prefect's ephemeral mode, a temporary server started in the background
  for the length of the command, its SQLite database in `PREFECT_HOME` (Prefect's default,
  `~/.prefect`; `make` points it into `.venv/prefect-home`).
- `PREFECT_API_URL` set (or set in the active Prefect profile): every flow run is recorded on that
  server, and provider limits become Prefect global concurrency limits (see `global_limits.py`).
"""

from __future__ import annotations

import logging
import os


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


def api_url() -> str | None:
    """The URL of a configured Prefect server, or None in ephemeral mode."""
    configure_prefect()
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _ReportedErrorLines(logging.Filter):
    """Prefect's ERROR lines (with tracebacks, one per flow and task the exception passes through)
    about an exception the command reports itself in one `featurescribe: error:` line: a user's
    mistake or a full disk. Dozens of lines would bury that one; the runs stay Failed on the server."""

    def __init__(self) -> None:
        super().__init__()
        self._left_out: set[str] = set()  # the messages of those exceptions

    def filter(self, record: logging.LogRecord) -> bool:
        from featurescribe.errors import FeaturescribeError, disk_full

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, FeaturescribeError) or disk_full(exc) is not None):
            if str(exc).strip():
                self._left_out.add(str(exc))
            return False
        # a task's 'Finished in state Failed(...)' line names the exception without carrying it
        return record.levelno < logging.ERROR or not any(m in record.getMessage() for m in self._left_out)


def quiet_reported_errors() -> None:
    """For the command line, whose `main` prints such errors in one line (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReportedErrorLines) for f in logger.filters):
            logger.addFilter(_ReportedErrorLines())
