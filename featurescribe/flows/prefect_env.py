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
