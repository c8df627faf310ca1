"""Reading `builtin:stdlib`: every module parsed, against the documents kept in the cache.

    python benchmarks/stdlib_corpus.py [--repeats 3]

Reads the whole corpus three ways, in one process: parsing every module (no cache), parsing and
keeping each module in a new, empty cache folder (a first read), and from that cache (the median of
`--repeats` reads). Checks that the three give the same documents. A profile for BENCHMARKS.md,
not part of `make bench`; the cache it writes is a temporary folder, not the user's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from featurescribe.harvest.stdlib_corpus import stdlib_documents  # noqa: E402


def timed_read(cache_in) -> tuple[float, list]:
    t0 = time.perf_counter()
    docs = list(stdlib_documents(cache_in=cache_in))
    return time.perf_counter() - t0, docs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    parse_s, parsed = timed_read(None)
    with tempfile.TemporaryDirectory() as tmp:
        first_s, first = timed_read(Path(tmp))
        cached = [timed_read(Path(tmp)) for _ in range(args.repeats)]
        kept_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
    if any(docs != parsed for docs in [first] + [d for _, d in cached]):
        raise SystemExit("the cache gave other documents than parsing")
    cached_s = statistics.median(s for s, _ in cached)
    print(f"builtin:stdlib: {len(parsed):,} documents, {sum(len(d) for d, _ in parsed) / 1e6:.1f}M characters; "
          f"cache {kept_bytes / 1e6:.1f} MB")
    print(f"stdlib_parse_s: {parse_s:.2f}")
    print(f"stdlib_first_read_s: {first_s:.2f}  (parsed and kept)")
    print(f"stdlib_cached_read_s: {cached_s:.3f}  (median of {args.repeats})")
    print(f"stdlib_cache_speedup: {parse_s / cached_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
