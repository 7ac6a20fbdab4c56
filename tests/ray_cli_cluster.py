"""A real multi-process Ray cluster on 127.0.0.1, started with the `ray` CLI as a user would.

`ray start --head` and `ray start --address` run as separate processes (`--block`, each in a
session of its own), with token authentication on and every port chosen free, so the cluster
never collides with other Ray instances on the machine. Conventions and edge cases:

- the Ray temp dir is a short folder under /tmp: Ray puts unix sockets in it, and their paths
  must stay under ~107 bytes;
- the token lives in that folder and reaches every Ray process through `RAY_AUTH_TOKEN_PATH`;
  the same variable marks this cluster's processes, so `stop()` ends exactly those (never a
  global `ray stop`: other tests run Ray at the same time);
- the Python environment's `bin/` leads PATH, so job entrypoints find `jal-search` and `ray`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow_server import free_port

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 200 * 1024**2  # a smoke search needs little; the default is 30% of RAM
NO_AGENT = "No available agent to submit job"  # Ray's transient refusal before its agent is up


class RayCliCluster:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
        self.token_path = self.temp_dir / "token"
        self.token_path.write_text(os.urandom(32).hex())
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, workers: int, timeout: float = 90.0) -> float:
        """Start the head, then `workers` worker nodes of one CPU each; returns the seconds."""
        began = time.monotonic()
        self._ray_start(
            "head",
            "--head",
            f"--port={self.port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        )
        self._wait(lambda: self._get("/api/gcs_healthz", auth=False) is not None, timeout)
        for i in range(workers):
            self._ray_start(f"worker{i}", f"--address={self.address}")
        self._wait(lambda: len(self.node_ids()) == 1 + workers, timeout)
        return time.monotonic() - began

    def node_ids(self) -> set[str]:
        """The ids of the nodes alive now, from the dashboard's state API."""
        body = self._get("/api/v0/nodes?limit=100")
        if body is None:
            return set()
        nodes = json.loads(body)["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def submit(self, *entrypoint: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """`ray job submit` and wait for the job; stdout and stderr together in `.stdout`.

        Right after `ray start` the head's job agent may not be up yet: Ray then refuses the
        submission ("No available agent …, please try again later") and we try again.
        """
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--"]
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                [*command, *entrypoint],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
            if NO_AGENT not in out.stdout or time.monotonic() > deadline:
                return out
            time.sleep(2)

    def stop(self) -> None:
        """SIGTERM every node, SIGKILL what is left after 5 s, then any stray process of ours."""
        for process in self.processes:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.2)
        for process in self.processes:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
        for pid in self.stray_pids():
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def stray_pids(self) -> list[int]:
        """Processes still carrying this cluster's token path in their environment."""
        marker = f"RAY_AUTH_TOKEN_PATH={self.token_path}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:  # gone meanwhile, or not ours to read
                    pass
        return found

    def _ray_start(self, name: str, *args: str) -> None:
        command = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # Ray's fixed defaults (52365, 8080, ...) would collide between nodes and clusters.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            *args,
        ]
        with open(self.log_dir / f"ray-{name}.log", "ab") as log:
            self.processes.append(
                subprocess.Popen(
                    command,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def _get(self, path: str, auth: bool = True) -> bytes | None:
        request = urllib.request.Request(self.dashboard + path)
        if auth:
            request.add_header("Authorization", f"Bearer {self.token_path.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def _wait(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in self.log_dir.glob("ray-*.log"))
                raise RuntimeError(f"Ray cluster did not come up (exited: {dead}):\n{logs}")
            time.sleep(0.3)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
