"""Test-only fault injection: Python imports this at startup when its folder is on PYTHONPATH.

Only the fault suite puts it there, for the `jal-search` processes it starts (driver and Ray
workers inherit the environment). It is inert unless `JAL_FAULT_PLAN` is set, and touches one
thing: when `jal_search.train` is imported, its `run_trial` is wrapped so that a Tune trial's
per-epoch `report` hook raises `InjectedFault` *before* reporting the fault epoch, as a crash
mid-epoch would (that epoch's work and checkpoint are lost). Everything under test — Tune's
retries, checkpoint restore, failure bookkeeping, results and MLflow — runs unmodified.

`JAL_FAULT_PLAN` is JSON: {"dir": folder for the attempt log, "epochs": [low, high],
"always": {param: value, ...}}. Each trial gets its fault epoch drawn from [low, high] by a
generator seeded with its trial's name; a trial whose sampled params match `always` raises on every
attempt, the others only on their first. Each attempt appends one line to `<dir>/<trial_id>`:
`start=<epoch it resumed from> raised=<epoch or ->`, so a test can see every retry and where
it started.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import zlib

PLAN = os.environ.get("JAL_FAULT_PLAN")
TARGET = "jal_search.train"


class InjectedFault(RuntimeError):
    """The exception the plan injects (its name is what the failure reason must show)."""


def _wrap(train):
    import numpy as np
    from ray import tune

    plan = json.loads(PLAN)
    original = train.run_trial

    def run_trial(config, report=None, resume=None):
        try:  # Tune's name for the trial is "<setting>-<trial>"; tables and MLflow use <trial>
            trial_id = tune.get_context().get_trial_name().rsplit("-", 1)[-1]
        except Exception:  # noqa: BLE001 - not inside a Tune trial: no fault
            trial_id = None
        if report is None or not trial_id:
            return original(config, report, resume)
        low, high = plan["epochs"]
        epoch = int(np.random.default_rng(zlib.crc32(trial_id.encode())).integers(low, high + 1))
        log = os.path.join(plan["dir"], trial_id)
        attempts = open(log).read().count("\n") if os.path.exists(log) else 0
        always = all(config.loss_params.get(k) == v for k, v in plan.get("always", {}).items())
        armed = always or attempts == 0
        start = int(resume["epoch"]) if resume else 0

        def faulty(metrics, state):
            if armed and metrics["epoch"] >= epoch:
                with open(log, "a") as f:
                    f.write(f"start={start} raised={int(metrics['epoch'])}\n")
                raise InjectedFault(f"injected at epoch {int(metrics['epoch'])} of {trial_id}")
            report(metrics, state)

        result = original(config, faulty, resume)
        with open(log, "a") as f:
            f.write(f"start={start} raised=-\n")
        return result

    train.run_trial = run_trial


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if PLAN:
    sys.meta_path.insert(0, _Finder())
