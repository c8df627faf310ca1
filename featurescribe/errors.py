"""Errors a user can cause. The CLI prints each as one line on stderr and exits non-zero; the
Python API raises them as they are.

Every class below is a `FeaturescribeError`, one per kind of mistake, so a notebook can catch
the kind it expects (`except featurescribe.UnknownSource`); the lookup errors are also
`LookupError`s and the bad values `ValueError`s, as Python code expects.
"""

import errno
from typing import Iterator


class FeaturescribeError(Exception):
    """An error with a message meant for the user: one line, no traceback."""

    exit_code = 2  # statuses.ExitStatus.USAGE


def first_error_line(err: BaseException) -> str:
    """`Type: first line of the message`, for a ledger or run note."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class DatabaseLocked(FeaturescribeError):
    """Another process holds the database's write lock."""


class PrefectUnreachable(FeaturescribeError):
    """`PREFECT_API_URL` names a Prefect server that does not answer."""


class PrefectServerGone(FeaturescribeError):
    """The configured Prefect server stopped answering while a flow ran: the work (local) is kept,
    the flow run's end is not recorded on the server."""

    exit_code = 1  # statuses.ExitStatus.ERROR


class SchemaTooNew(FeaturescribeError):
    """The database was written by a newer featurescribe."""


class NoDatabase(FeaturescribeError, FileNotFoundError):
    """No database file where one was expected."""


class UnknownSource(FeaturescribeError, LookupError):
    """A source id the database does not hold."""


class UnknownFeature(FeaturescribeError, LookupError):
    """A feature id outside a source, or not in its `features` table."""


class NoEmbeddings(FeaturescribeError, LookupError):
    """A semantic search on a database without label embeddings (by that embedder)."""


class BadOption(FeaturescribeError, ValueError):
    """An option value or keyword argument that is not allowed."""


class SQLFailed(FeaturescribeError):
    """A query DuckDB refused; the message carries its first line."""


class MissingDependency(FeaturescribeError, ImportError):
    """An optional package (pandas, polars, sae-lens, ...) that a call needs is not installed."""


class DiskFull(FeaturescribeError, OSError):
    """The disk filled up while a command wrote; what it had committed before is kept."""

    exit_code = 1  # statuses.ExitStatus.ERROR: the run failed midway, it is not bad input


class DamagedDatabase(FeaturescribeError):
    """DuckDB cannot read part of the database file: it was cut short or overwritten."""

    exit_code = 1  # statuses.ExitStatus.ERROR: not bad input


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and the errors it was raised from or while handling (a Prefect flow's, a cleanup's)."""
    seen: BaseException | None = err
    for _ in range(16):  # a chain is short; a cycle in it must not hang the error path
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def disk_full(err: BaseException) -> DiskFull | None:
    """A `DiskFull` for an error that a full disk caused, else None: an OSError ENOSPC, or DuckDB's
    IO and transaction errors (their own classes, with the OS's words in the message), also when a
    later error was raised while handling it."""
    for seen in _chain(err):
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left on device" in str(seen):
            return DiskFull(f"the disk is full ({first_error_line(seen)}); what was committed is kept: free some "
                            "space and run the same command again")
    return None


# DuckDB's words for a block it cannot read: past the end of the file, or failing its checksum
_DAMAGE_SIGNS = ("Could not read enough bytes", "Corrupt database file")


def damaged_database(err: BaseException, path: str | None) -> DamagedDatabase | None:
    """A `DamagedDatabase` for DuckDB's error on reading a block of a file cut short or overwritten
    (which it finds only when a query first reads that block), else None."""
    for seen in _chain(err):
        lines = str(seen).strip().splitlines()
        if lines and any(sign in lines[0] for sign in _DAMAGE_SIGNS):
            name = f"database {path}" if path else "the database"
            return DamagedDatabase(f"{name} is damaged ({lines[0]}): DuckDB cannot read part of it; restore it "
                                   "from a copy, or harvest into a new file")
    return None


def beyond_retrying(err: BaseException) -> bool:
    """A user's mistake, a full disk or a damaged database: trying again at once cannot mend it (so
    a flow does not retry it), and the command line reports it in one line."""
    return (isinstance(err, FeaturescribeError) or disk_full(err) is not None
            or damaged_database(err, None) is not None)
