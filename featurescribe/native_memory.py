"""When freed heap memory goes back to the operating system, and when the heap keeps it.

Long runs open and close a DuckDB instance many times (each harvest commit, each label chunk's
sampling and write). glibc keeps the freed buffers of each closed instance in the process's heap,
so without a trim the RSS of a run grew with the number of openings, not with its data.

A forward pass on the CPU has the opposite problem: with glibc's default settings every large
tensor it frees goes back to the OS (unmapped, or trimmed off the heap's top), and the next batch
page-faults the same memory in again, zeroed by the kernel: about 68,000 faults per batch of
smollm2-135m, up to a sixth of its forward time on 2 cores (BENCHMARKS.md, tenth session).
`keep_freed_memory_for_tensors` makes the heap keep that memory for the next batch.
"""

from __future__ import annotations

import functools


# mallopt's parameters (malloc.h) and the values a CPU forward pass wants
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TENSOR_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TENSOR_TRIM_THRESHOLD = 1 << 30  # free memory the heap's top may keep between batches


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc's functions, or None where the C library is another (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def keep_freed_memory_for_tensors() -> bool:
    """Let the heap keep freed tensor memory for reuse instead of handing it back at every free
    (for the rest of the process; True where it took effect). Both settings are needed: a fixed
    mmap threshold alone leaves glibc's 128 KiB trim threshold, and a trim threshold alone turns
    off the sliding mmap threshold, so that every large tensor is mapped afresh.

    Memory is still handed back by `return_freed_memory` (each harvest commit, a harvest's end)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, TENSOR_MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TENSOR_TRIM_THRESHOLD))


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS.

    Called after a DuckDB instance closes (a harvest commit, a label chunk's write); a trim costs
    a few milliseconds."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
