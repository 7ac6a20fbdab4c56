"""What every benchmark shares: the run's header, interleaved timing, and ratio lines.

These machines are shared and noisy, so a benchmark never reports a time alone: it times its arms
interleaved (repeat r runs every arm once, in an order rotated by r, so drift and other load hit
all arms alike) and prints ratios of medians measured in the same run. Output lines that tests and
README read start with `ratio ` and have the form

    ratio <name>: <value> (target <op> <threshold>: met|missed)
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torchvision", "numpy", "ray", "optuna", "jal-search")


def parser(description: str, timing: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes (`timing`: --threads, --clock)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--short", action="store_true", help="seconds to ~1 min (tests, CI)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per arm")
    if timing:
        p.add_argument("--threads", type=int, default=1, help="torch threads (a trial's share)")
        p.add_argument(
            "--clock",
            choices=["cpu", "wall"],
            default="cpu",
            help="cpu: this process's CPU seconds, which other load on a shared machine barely "
            "moves (default); wall: elapsed seconds",
        )
    return p


def header(name: str, args: argparse.Namespace, **facts: object) -> None:
    """Print the machine, versions, mode and the benchmark's own facts (repeats, sizes)."""
    print(f"# {name}  {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    print(f"machine: {_cpu_model()}, {os.cpu_count()} CPUs, load average {_load()}")
    print(f"python {platform.python_version()}; " + ", ".join(_versions()))
    run = f"git {_git_sha()}; mode {'short' if args.short else 'full'}"
    if hasattr(args, "clock"):
        run += f"; threads {args.threads}; clock {args.clock}"
    print(run)
    for key, value in facts.items():
        print(f"{key}: {value}")
    sys.stdout.flush()


def interleaved(arms: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every arm `repeats` times, rotating the order each repeat; each call returns seconds."""
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(arms[name]())
    return times


def forever(batches: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """Batches of epoch 0, 1, 2, … without end (`batches(epoch)`: one epoch's)."""
    for epoch in itertools.count():
        yield from batches(epoch)


def clock(name: str) -> Callable[[], float]:
    """`cpu`: the process's CPU time (all its threads, not its children); `wall`: elapsed time."""
    return time.process_time if name == "cpu" else time.perf_counter


def timed(fn: Callable[[], object], now: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call by the clock `now`."""
    began = now()
    fn()
    return now() - began


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """`median [min, max]`, for the per-arm lines."""
    return f"{median(values):.4g} [{min(values):.4g}, {max(values):.4g}]"


def ratio(name: str, value: float, op: str, threshold: float) -> bool:
    """Print one ratio line; return whether the target is met."""
    met = value >= threshold if op == ">=" else value <= threshold
    print(f"ratio {name}: {value:.3f} (target {op} {threshold:g}: {'met' if met else 'missed'})")
    sys.stdout.flush()
    return met


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _versions() -> list[str]:
    out = []
    for package in PACKAGES:
        try:
            out.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            out.append(f"{package} (absent)")
    return out


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
