"""llama.cpp's OpenAI-compatible server (the `llama-cpp-python[server]` package) in a subprocess
on 127.0.0.1, serving a GGUF file: a real server for tests, not a fake.

    with LlamaCppServer(gguf_path) as server:
        server.base_url          # http://127.0.0.1:PORT/v1, for OPENAI_BASE_URL

`make setup` builds the package (see the Makefile: a CPU-only build of the library alone). A
test that needs it calls `require_llama_cpp()`: it skips where the package is not installed,
and fails instead where FEATURESCRIBE_REQUIRE_LLAMA_CPP=1 (CI sets it), so CI cannot skip it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.processes import end_process

REQUIRE_VAR = "FEATURESCRIBE_REQUIRE_LLAMA_CPP"


def require_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None:
        return
    why = "llama-cpp-python[server] is not installed (make setup builds it)"
    if os.environ.get(REQUIRE_VAR, "").strip() in ("1", "true", "yes"):
        pytest.fail(f"{why}, and {REQUIRE_VAR} says this run needs it")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """`python -m llama_cpp.server` on a free port; `start()` waits until /v1/models answers."""

    def __init__(self, gguf: Path, log_path: Path, *, n_ctx: int = 2048, n_threads: int = 2,
                 startup_timeout_s: float = 180.0):
        self.gguf, self.log_path = Path(gguf), Path(log_path)
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads),
                "--n_threads_batch", str(self.n_threads), "--verbose", "False"]

    def start(self) -> "LlamaCppServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp's server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.models() is not None:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama.cpp's server did not answer in {self.startup_timeout_s:g} s:\n{self.log_tail()}")

    def models(self) -> list[str] | None:
        """The model ids GET /v1/models lists; None while the server does not answer."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                return [m["id"] for m in json.load(r)["data"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError):
            return None

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 20)
        self._log.close()

    def __enter__(self) -> "LlamaCppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
