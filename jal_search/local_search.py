"""A search in this process, without Ray (`executor: local`): trials in threads of the driver.

For a search that fits this machine's CPUs, where Ray's fixed costs weigh on a search of minutes
(its own processes, a process per trial slot that imports torch again, its shutdown: about 10 s
on 2 CPUs). The record is the one a search under Ray keeps — each setting's Optuna study
(`studies`), each trial's journal and checkpoints (`recorded`) — so `resume`, `extend`, `results`
and MLflow read it alike. As under Tune, settings follow each other (a setting's last trials
share the slots with the next one's first trials), each setting has its own promotion rule, and a
trial that raises is retried from its last checkpoint up to `max_failures` times. What it gives up
is the isolation of a process per trial: a crash of the process itself (a segfault, the OOM
killer) ends the search, and `resume` continues it from the record.
"""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from jal_search.errors import UserError
from jal_search.experiment import (
    SETTING,
    TRIAL,
    check_space,
    ended,
    ended_status,
    no_space,
    sampled,
    storage_full,
)
from jal_search.metrics import SELECTION
from jal_search.recorded import failure_reason, train_recorded
from jal_search.spec import SearchSpec, SettingPlan
from jal_search.studies import SuccessiveHalving, setting_searches, trial_name, unfinished
from jal_search.train import keep_freed_memory, run_trial

# The storage check, and how soon Ctrl-C is heard and a paused trial let go on takes a free slot.
CHECK_EVERY_S = 0.25


class _Stop(Exception):
    """Raised from a trial's report to end it: its promotion rule stopped it, or the search is
    stopping (the trial then stays unfinished, for `resume`)."""


def slots(spec: SearchSpec, num_cpus: int | None) -> int:
    """How many trials run at once: `max_concurrent_trials`, else as many as the CPUs hold at
    `resources.cpus_per_trial` each. A trial larger than the machine is refused."""
    cpus = num_cpus or os.cpu_count() or 1
    if spec.resources.cpus_per_trial > cpus:
        raise UserError(
            f"resources.cpus_per_trial: {spec.resources.cpus_per_trial:g} exceeds this "
            f"machine's {cpus} CPUs; lower it"
        )
    return spec.max_concurrent_trials or max(1, int(cpus // spec.resources.cpus_per_trial))


def run_search(
    spec: SearchSpec,
    plans: Sequence[SettingPlan],
    experiment_dir: str,
    counts: dict[str, int],
    slots: int,
    tracker: Any = None,
    on_setting_start: Callable[[str], None] | None = None,
    train: Callable[..., Any] = run_trial,
) -> dict[str, list[dict[str, Any]]]:
    """Run, or carry on with, every noise setting of a search, `slots` trials at a time.

    As `tune_adapter.run_search`: `counts[name]` trials per setting in all, unfinished ones first
    (from their checkpoints); returns, per setting, the trials that finally failed in this run
    (name and why); raises KeyboardInterrupt when trials are left unfinished (Ctrl-C), and
    `no_space`'s UserError when the storage path fills. Calling it again carries on.
    """
    keep_freed_memory()  # as Ray's trial processes have it (train.MALLOC_*)
    path = Path(experiment_dir)
    searches = setting_searches(spec, plans, path, counts)
    rules = {p.name: _rule(spec) for p in plans}
    by_name = {p.name: p for p in plans}
    lock = threading.Lock()  # the studies, rules, tracker and output: one trial at a time
    stopping = threading.Event()
    failures: dict[str, list[dict[str, Any]]] = {p.name: [] for p in plans}
    full: list[BaseException] = []
    origin = {"node_id": platform.node(), "pid": os.getpid()}

    def run_one(name: str, number: int, config: dict[str, Any]) -> None:
        params = {**config, SETTING: name, TRIAL: trial_name(number)}
        trial, search, rule = params[TRIAL], searches[name], rules[name]
        last: dict[str, Any] = {}
        verdict = "go"  # its promotion rule's, on its last epoch

        def deliver(row: dict[str, Any]) -> None:
            nonlocal verdict
            last.clear()
            last.update(row)
            epoch, value = int(row["epoch"]), row.get(SELECTION, math.nan)
            with lock:
                search.report(number, epoch, value)
                if tracker:
                    tracker.on_result(name, trial, sampled(params), row)
                verdict = search.judge(number, epoch, value)  # paused halving's
                if rule is not None and not rule.goes_on(trial, epoch, value):
                    verdict = "stop"
            if verdict != "go" or stopping.is_set():
                raise _Stop

        with lock:
            if on_setting_start:
                on_setting_start(name)
        folder = path / name / trial
        for attempt in range(spec.max_failures + 1):
            try:
                train_recorded(params, by_name[name], folder, train, deliver, origin)
            except _Stop:
                pass
            except Exception as err:  # noqa: BLE001 - a trial's failure is recorded, not raised
                if storage_full(experiment_dir, [err]):
                    full.append(err)
                    stopping.set()
                elif attempt < spec.max_failures:
                    _say(f"{name} {trial}: {failure_reason(err)}; again from its last checkpoint")
                    continue
                else:
                    with lock:
                        search.drop(number)
                        failures[name].append({"trial_id": trial, "error": failure_reason(err)})
                        if tracker:
                            tracker.on_trial_end(name, trial, "failed")
                        _say(f"{name} {trial}: failed ({failure_reason(err)})")
                    return
            break
        judged = verdict != "go"
        if stopping.is_set() and not (judged or ended(last or None, spec.budget.epochs)):
            with lock:
                search.drop(number)  # cut short: `resume` carries it on from its checkpoint
            return
        with lock:
            search.tell(number, last or None)  # a paused trial waits in its study
            if verdict == "pause":
                _say_end(name, trial, "paused", last)
            else:
                end(name, trial, last)
            end_stopped()

    def end_stopped() -> None:
        """End the paused trials their rule has stopped (as a trial ends, fails, or the next is
        asked for: whatever decided them)."""
        for name, search in searches.items():
            for number, row in search.take_stopped():
                end(name, trial_name(number), row)

    def end(name: str, trial: str, last: dict[str, Any]) -> None:
        status = ended_status(last, spec.budget.epochs)
        if tracker:
            tracker.on_trial_end(name, trial, status)
        _say_end(name, trial, status, last)

    def next_trial() -> tuple[str, int, dict[str, Any]] | None:
        with lock:
            try:
                for name, search in searches.items():
                    chosen = search.next()
                    if chosen is not None:
                        return name, *chosen
            finally:
                end_stopped()
        return None

    with ThreadPoolExecutor(slots, thread_name_prefix="trial") as pool:
        running: set[Future] = set()
        try:
            while True:
                while not stopping.is_set() and len(running) < slots:
                    chosen = next_trial()
                    if chosen is None:
                        break
                    running.add(pool.submit(run_one, *chosen))
                if not running:
                    break
                done, running = wait(running, timeout=CHECK_EVERY_S, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a bug in the loop itself, not a trial's failure
                check_space(experiment_dir)
        except BaseException:
            stopping.set()  # Ctrl-C, a full disk: every trial stops at its next epoch
            wait(running)
            raise
    if full:
        raise no_space(experiment_dir)
    if stopping.is_set() or unfinished(searches) > sum(map(len, failures.values())):
        raise KeyboardInterrupt("the search stopped before its trials finished")
    return failures


def _rule(spec: SearchSpec) -> SuccessiveHalving | None:
    """A setting's promotion rule (`asha` is refused for this executor by the spec)."""
    if spec.scheduler.type == "successive_halving":
        return SuccessiveHalving(spec.scheduler.grace_period, spec.scheduler.reduction_factor)
    return None


def _say_end(name: str, trial: str, status: str, last: dict[str, Any]) -> None:
    value = last.get(SELECTION, math.nan)
    _say(f"{name} {trial}: {status} at epoch {int(last.get('epoch', 0))}, {SELECTION} {value:.4f}")


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
