"""Serving the browse app on uvicorn: on a socket we bind first (so a port in use is one clear
error, not a log line), in the foreground (`featurescribe browse`) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass

from featurescribe.errors import FeaturescribeError


def bind(host: str, port: int) -> socket.socket:
    try:  # the family of the address: "::1" or "::" is IPv6
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise FeaturescribeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    # the connections of a browse just stopped linger in TIME_WAIT for a minute; without this its
    # port could not be taken again until then (a port another process listens on is still refused)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise FeaturescribeError(f"port {port} on {host} is in use; pick another with --port") from None
        raise FeaturescribeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    return sock


def make_server(db_path: str, sock: socket.socket):
    import uvicorn

    from featurescribe.web.app import BrowseState, create_app

    state = BrowseState(db_path)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config), state


@dataclass
class Running:
    url: str
    server: object
    thread: threading.Thread
    state: object

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.close()


def serve_in_thread(db_path: str, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Running:
    """Start the app in a background thread; returns once it accepts connections."""
    sock = bind(host, port)
    server, state = make_server(db_path, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fs-browse")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            state.close()
            raise RuntimeError("the browse server did not start")
        time.sleep(0.02)
    return Running(url(host, sock), server, thread, state)


def url(host: str, sock: socket.socket) -> str:
    """The address to open: an IPv6 host in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
