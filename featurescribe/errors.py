"""Errors a user can cause. The CLI prints each as one line on stderr and exits non-zero."""


class FeaturescribeError(Exception):
    """An error with a message meant for the user: one line, no traceback."""

    exit_code = 2


class DatabaseLocked(FeaturescribeError):
    pass


class SchemaTooNew(FeaturescribeError):
    pass
