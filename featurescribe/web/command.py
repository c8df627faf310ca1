"""`featurescribe browse --db PATH [--port N] [--host H]`: serve the browse app until interrupted."""

from __future__ import annotations

import argparse

from featurescribe.store.connection import DEFAULT_DB

DEFAULT_PORT = 8765


def add_browse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")


def run_browse(args: argparse.Namespace) -> int:
    from featurescribe.errors import FeaturescribeError
    from featurescribe.web.server import bind, make_server, url

    if not 0 <= args.port <= 65535:
        raise FeaturescribeError(f"--port must be 0 to 65535, not {args.port}")
    sock = bind(args.host, args.port)
    print(f"reading {args.db} (read-only) ...", flush=True)
    try:
        server, state = make_server(args.db, sock)
    except BaseException:
        sock.close()
        raise
    print(f"browse {args.db} at {url(args.host, sock)}/ (read-only; Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        state.close()
    return 0
