"""Helpers of the fault suite: real `jal-search` processes, their files, their sockets.

Every fault test drives the real command in a subprocess (its own private Ray, started by the
command itself) and injects the fault from outside: a signal, a stopped server, a full disk, a
damaged file. Ray's temporary files go to a fresh short folder per process (`RAY_TMPDIR`), so
a test can search them too and concurrent tests never share a Ray session.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jal_search.journal import JOURNAL, read_journal

INJECT = Path(__file__).resolve().parent / "inject"  # sitecustomize.py: the trial-fault plugin

BASE_SPEC: dict[str, Any] = {  # digits, JAL-CE: seconds per trial on 2 CPUs
    "dataset": "digits",
    "loss": "jal_ce",
    "noise": {"symmetric": [0.4]},
    "space": {"alpha": {"loguniform": [0.3, 100]}},
    "budget": {"trials": 4, "epochs": 6},
    "scheduler": {"type": "none"},  # every trial runs its full budget unless a fault ends it
    "max_concurrent_trials": 2,
}


def write_spec(folder: Path, name: str, **changes: Any) -> Path:
    """A spec file `<folder>/<name>.yaml` storing experiments under `<folder>/runs`."""
    spec = {"name": name, **BASE_SPEC, "storage_path": str(folder / "runs"), **changes}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def environment(ray_tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment with Ray's temporary files under `ray_tmp`, plus `extra`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp), **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jal_search.cli", *args]


STARTED: list[subprocess.Popen[str]] = []  # background processes; conftest ends leftovers


def start(args: list[str], logs: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`jal-search ARGS` in the background, in a process group of its own (with its Ray);
    stdout/stderr go to `<logs>.out` / `<logs>.err`."""
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
        process = subprocess.Popen(
            command(*args), env=env, stdout=out, stderr=err, text=True, start_new_session=True
        )
    STARTED.append(process)
    return process


def output(logs: Path) -> tuple[str, str]:
    return Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def jal(*args: str, env: dict[str, str], timeout: float = 300) -> Any:
    """`jal-search ARGS` to completion, output captured."""
    return subprocess.run(command(*args), env=env, capture_output=True, text=True, timeout=timeout)


def wait_until(condition: Callable[[], bool], process: Any, what: str, timeout: float = 240):
    """Poll `condition` while `process` runs; fail if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def trial_rows(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    """`setting/trial` → its journal's rows, for every trial of an experiment."""
    return {
        f"{p.parent.parent.name}/{p.parent.name}": read_journal(p.parent)[1]
        for p in sorted(experiment.glob(f"*/*/{JOURNAL}"))
    }


def trial_epochs(experiment: Path) -> dict[str, list[int]]:
    """`setting/trial` → the epochs its journal holds, in order."""
    return {k: [int(r["epoch"]) for r in rows] for k, rows in trial_rows(experiment).items()}


def reported(experiment: Path) -> int:
    """Epoch rows recorded so far, over all trials."""
    return sum(len(v) for v in trial_epochs(experiment).values())


def finished(experiment: Path, budget: int) -> dict[str, list[int]]:
    return {k: v for k, v in trial_epochs(experiment).items() if v and v[-1] == budget}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def files_containing(secret: str, *roots: Path) -> list[Path]:
    """Every file under `roots` whose bytes contain `secret` (binary files included)."""
    needle = secret.encode()
    hits = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size:
                try:
                    if needle in path.read_bytes():
                        hits.append(path)
                except OSError:  # a socket or a file gone meanwhile
                    continue
    return hits


# ---------------------------------------------------------------------------- listening sockets
def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


def _address(hex_ip: str) -> str:
    """/proc/net/tcp{,6} addresses: IPv4 as one little-endian word, IPv6 as four."""
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of every TCP socket these processes listen on."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ip, port = fields[1].split(":")
                sockets[fields[9]] = (_address(ip), int(port, 16))
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # the process ended meanwhile
            continue
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in sockets:
                found.append((pid, name, *sockets[inode]))
    return found


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as gRPC reports it
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
