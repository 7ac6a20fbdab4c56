"""A real `mlflow server` process for tests: SQLite backend, served artifacts, 127.0.0.1 only.

One uvicorn worker and no job consumers (STACK.md: ~0.5 GB and 6–9 s to start instead of 2.5 GB
and 29 s). `stop()` then `start()` brings it back on the same port and database, which is how
tests simulate an outage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1 and never handed out before by this process: the OS may
    offer a just-released port again, and two components given one port collide (a Ray node
    refuses to start)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    def start(self, timeout: float = 90.0) -> float:
        """Start and wait until /health answers; returns the seconds it took."""
        began = time.monotonic()
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'db.sqlite'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "ab") as log:
            # A session of its own: `stop` ends the server and the uvicorn worker it spawns.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        while time.monotonic() - began < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return time.monotonic() - began
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        """SIGTERM the server's process group; SIGKILL what is left after 15 s."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader's pid is the group id
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (self.process.poll() is None or self._listening()):
            time.sleep(0.1)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(5)
        self.process = None

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0
