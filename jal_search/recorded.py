"""One trial trained into its own folder, whoever runs it (a Tune trial actor, or a thread of
`local_search`): its journal (the resolved config, then a row per epoch, `journal.py`), a
checkpoint per epoch, and after any restart a resume from the last one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jal_search.experiment import ended, sampled, trial_header
from jal_search.journal import Checkpoints, Journal, sole_writer
from jal_search.spec import SettingPlan


def train_recorded(
    params: dict[str, Any],
    plan: SettingPlan,
    folder: Path,
    train: Callable[..., Any],
    deliver: Callable[[dict[str, Any]], None],
    origin: dict[str, Any],
) -> None:
    """Train the sampled point `params` of `plan`'s space (tagged with its setting and trial) in
    `folder`, with `train` (`run_trial`'s signature). Each epoch's row, with `origin` (which node
    and process trained it), is in the journal and its checkpoint written before `deliver(row)`
    hands it on; a trial that had ended before a restart delivers its last row once more."""
    with sole_writer(folder):
        config = plan.trial(sampled(params)).resolve()
        checkpoints = Checkpoints(folder)
        resume = checkpoints.latest()
        journal = Journal(folder)
        journal.open(trial_header(params, config), int(resume["epoch"]) if resume else 0)

        def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
            row = {**metrics, "label_hash": state["label_hash"], **origin}
            journal.append(row)
            checkpoints.save(state)
            deliver(row)

        last = resume["history"][-1] if resume and resume["history"] else None
        if resume is not None and ended(last, config.epochs):
            deliver(last)  # ended before the driver heard: say how, once more
            return
        train(config, report=report, resume=resume)


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial failed: the trial's own exception, not Ray's wrapper.

    Under Ray, Tune hands back a `RayTaskError` whose text is a colored worker banner (pid, ip,
    actor id); the exception the trial raised is its `cause` (the cause's cause, for one a pack
    worker raised into its trial).
    """
    cause = error
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
