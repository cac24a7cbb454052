"""scripts/serve.py as a real process on 127.0.0.1 for tests: started on a free port, waited for, stopped; and
`demo_server`, one such server with the demo model and the default settings (no authentication, CORS off), shared
by the test files that import the fixture."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from tests.script_utils import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Server:
    base: str  # http://127.0.0.1:PORT
    log: Path  # its stdout and stderr

    def log_text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def serving(args: Sequence[str], folder: Path, startup_s: float = 120.0) -> Iterator[Server]:
    """Run `scripts/serve.py --port N *args` with `folder` as its working folder; yields it once it answers (any
    HTTP status, a 401 included), and stops it with SIGTERM (then SIGKILL) afterwards."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = folder / f"serve-{port}.log"
    log = open(log_path, "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"), "--device", "cpu", "--precision", "full", "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
    )
    try:
        end = time.monotonic() + startup_s
        while True:
            assert proc.poll() is None, "server exited: " + log_path.read_text()
            try:
                urllib.request.urlopen(f"{base}/sdapi/v1/samplers", timeout=5).close()
                break
            except urllib.error.HTTPError:  # it answers (401 when it wants credentials)
                break
            except OSError:
                assert time.monotonic() < end, "server did not start: " + log_path.read_text()
                time.sleep(0.2)
        yield Server(base, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory) -> Iterator[Server]:
    """`scripts/serve.py` with the demo model (no --ckpt, run from an empty folder) and the default flags."""
    folder = tmp_path_factory.mktemp("demo_server")
    with serving([], folder) as server:
        yield server
