"""Trials per hour: K trials packed in one process (`jal_search.packed`) vs one trial per process.

Every arm is a fresh child process with one torch thread (a trial's CPU share under Tune), so the
packed arms pay process start-up once per pack and the one-per-process arm once per trial, as they
would in a search. Trials are the embedded default's (MNIST, cnn_small, JAL-CE; a 20k subset and
a few epochs to keep the run short); members differ in seed, noisy labels and (α, β, a).

Reported per arm, from the child's own rusage: CPU seconds per trial (user + system), wall seconds
per trial, and peak resident memory per trial (the pack's peak divided by K). The target ratio —
trials per CPU-hour packed at K = 8 over one per process, ≥ 3 — uses CPU time, which other load
on a shared machine barely moves; the wall-time ratio is printed beside it.

A "start-up" arm (imports, data and noisy labels, no training) splits each arm's cost into a
fixed part and a per-epoch part, so the ratio for longer trials can be read off: the script
prints it for the quick spec's 8 epochs.

    .venv/bin/python benchmarks/packed.py --short     # digits, ~1 min
    .venv/bin/python benchmarks/packed.py             # MNIST 20k × 2 epochs, ~5 min
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _common

SCRIPT = Path(__file__).resolve()
EPOCHS = 2  # per trial in full mode (short mode: 3 epochs of digits)
QUICK_EPOCHS = 8  # the quick spec's budget, for the extrapolated ratio


@dataclass(frozen=True)
class Usage:
    wall: float
    cpu: float
    peak_mib: float


def member_configs(n: int, short: bool) -> list[dict]:
    """n trial configs as a search would sample them: own seed, own noise, own loss parameters."""
    base = (
        {"dataset": "digits", "epochs": 3}
        if short
        else {"dataset": "mnist", "train_subset": 20000, "epochs": EPOCHS}
    )
    return [
        {
            **base,
            "noise_type": "symmetric",
            "noise_rate": 0.6,
            "loss": "jal_ce",
            "loss_params": {"alpha": 1.0 + i, "beta": 1.0 / (1 + i), "a": 30.0 - 2 * i},
            "seed": 100 + i,
            "threads": 1,
            "device": "cpu",
        }
        for i in range(n)
    ]


def child(kind: str, configs: list[dict]) -> None:
    """Run inside the child process: train the configs one by one or as one pack."""
    from jal_search.config import TrialConfig

    cfgs = [TrialConfig(**c) for c in configs]
    if kind == "startup":
        from jal_search.train import prepare_data

        prepare_data(cfgs[0].resolve())
    elif kind == "single":
        from jal_search.train import run_trial

        for c in cfgs:
            run_trial(c)
    else:
        from jal_search.packed import run_packed

        run_packed(cfgs)


def spawn(kind: str, configs: list[dict], env: dict[str, str]) -> Usage:
    """Run one child; its wall time, CPU time and peak RSS (from wait4's rusage)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--child", kind, "--configs", json.dumps(configs)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child {kind} failed with exit code {proc.returncode}")
    return Usage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--packs", default="2,4,8", help="pack sizes K")
    p.add_argument(
        "--child-env",
        nargs="*",
        help="KEY=VALUE set in every child (default: the malloc settings trial processes get, "
        "tune_adapter.MALLOC_ENV; --child-env alone: glibc's defaults)",
    )
    p.add_argument("--child", choices=["startup", "single", "packed"], help=argparse_hidden())
    p.add_argument("--configs", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args.child, json.loads(args.configs))
        return
    packs = [int(k) for k in args.packs.split(",")]
    repeats = args.repeats or (1 if args.short else 2)
    singles = 2  # one-per-process trials per repeat (each in its own process)
    if args.child_env is None:
        from jal_search.tune_adapter import MALLOC_ENV

        env = dict(MALLOC_ENV)
    else:
        env = dict(kv.split("=", 1) for kv in args.child_env)
    workload = member_configs(1, args.short)[0]
    _common.header(
        "packed",
        args,
        workload={k: v for k, v in workload.items() if k not in ("loss_params", "seed")},
        arms=f"start-up, one-per-process ×{singles} trials, packed K={packs}",
        repeats=repeats,
        clock="child rusage (CPU) and wall; 1 thread per process",
        child_env=env or "(none: glibc's defaults)",
    )
    configs = {"one-per-process": member_configs(singles, args.short)}
    arms = {
        "start-up": lambda: [spawn("startup", configs["one-per-process"][:1], env)],
        "one-per-process": lambda: [spawn("single", [c], env) for c in configs["one-per-process"]],
    }
    sizes = {"start-up": 1, "one-per-process": 1}
    for k in packs:
        name = f"packed K={k}"
        configs[name], sizes[name] = member_configs(k, args.short), k
        arms[name] = lambda name=name: [spawn("packed", configs[name], env)]
    runs: dict[str, list[Usage]] = {name: [] for name in arms}
    for r in range(repeats):
        names = list(arms)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].extend(arms[name]())

    def per_trial(name: str, field: str) -> float:
        return _common.median([getattr(u, field) / sizes[name] for u in runs[name]])

    print()
    for name in arms:
        print(
            f"  {name:16} per trial: CPU s {per_trial(name, 'cpu'):7.2f}, wall s "
            f"{per_trial(name, 'wall'):7.2f}, peak MiB {per_trial(name, 'peak_mib'):7.1f}"
        )
    epochs = workload["epochs"]
    startup = per_trial("start-up", "cpu")
    base_cpu, base_wall = per_trial("one-per-process", "cpu"), per_trial("one-per-process", "wall")
    base_epoch = (base_cpu - startup) / epochs
    print(
        f"  fixed cost per process: {startup:.2f} CPU s; one-per-process epoch {base_epoch:.2f} s"
    )
    for k in packs:
        name = f"packed K={k}"
        epoch = (per_trial(name, "cpu") - startup / k) / epochs
        line = f"  {name}: trials/hour ×{base_wall / per_trial(name, 'wall'):.2f} by wall time"
        if min(epoch, base_epoch) > 0.05 * startup:  # else training is lost in start-up noise
            at_quick = (startup + QUICK_EPOCHS * base_epoch) / (startup / k + QUICK_EPOCHS * epoch)
            line += (
                f"; epoch per member {epoch:.2f} CPU s ({epoch / base_epoch:.2f}× one per "
                f"process); ×{at_quick:.2f} extrapolated to {QUICK_EPOCHS}-epoch trials"
            )
        print(line)
        _common.ratio(
            f"packed K={k} / one-per-process trials per CPU-hour",
            base_cpu / per_trial(name, "cpu"),
            ">=",
            3.0 if k == 8 else 1.0,
        )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
