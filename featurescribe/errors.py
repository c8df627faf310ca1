"""Errors a user can cause. The CLI prints each as one line on stderr and exits non-zero."""


class FeaturescribeError(Exception):
    """An error with a message meant for the user: one line, no traceback."""

    exit_code = 2  # statuses.ExitStatus.USAGE


def first_error_line(err: BaseException) -> str:
    """`Type: first line of the message`, for a ledger or run note."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class DatabaseLocked(FeaturescribeError):
    pass


class SchemaTooNew(FeaturescribeError):
    pass
