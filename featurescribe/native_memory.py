"""Handing freed heap memory back to the operating system.

Long runs open and close a DuckDB instance many times (each harvest commit, each label chunk's
sampling and write). glibc keeps the freed buffers of each closed instance in the process's heap,
so without a trim the RSS of a run grew with the number of openings, not with its data.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS.

    Called after a DuckDB instance closes (a harvest commit, a label chunk's write); a trim costs
    a few milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
