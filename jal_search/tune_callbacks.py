"""What Tune tells the driver as a search runs, and what the driver keeps from it.

Part of the Ray adapter (`tune_adapter` and the `tune_*` modules, the only ones that import Ray).
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from typing import Any

from ray import tune

from jal_search.errors import UserError
from jal_search.experiment import SETTING, TRIAL, TrialRecord, sampled

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A search stops (resumably) when less than this is free under the storage path: checkpoints and
# journals cannot be written on a full disk, and every trial would fail and burn its retries.
STORAGE_RESERVE = 64 << 20


def storage_full(experiment_dir: str, errors: list[BaseException]) -> bool:
    """Whether trials failed, or Tune broke, because the storage path is full.

    On a full disk every trial fails (its checkpoint cannot be written) and burns its retries; a
    setting ended that way must stay unfinished so that `resume` reruns those trials once there
    is space again. Full: a trial failed with ENOSPC/EDQUOT, or less than STORAGE_RESERVE is left.
    """
    causes = [getattr(e, "cause", None) or e for e in errors]
    if any(isinstance(c, OSError) and c.errno in STORAGE_ERRNOS for c in causes):
        return True
    try:
        return shutil.disk_usage(experiment_dir).free < STORAGE_RESERVE
    except OSError:  # not a local path
        return False


def no_space(experiment_dir: str) -> UserError:
    return UserError(
        f"storage_path: no space left under {experiment_dir}; free some space, then run "
        f"`jal-search resume {experiment_dir}` (finished trials are kept)"
    )


class StorageGuard(tune.Callback):
    """Ends the search with a UserError once free space under the storage path drops below
    STORAGE_RESERVE, checked at most once a second on the driver.

    The error leaves Tune's loop like a killed driver would: every finished epoch is in its
    trial's journal, and `resume` continues the unfinished trials from their checkpoints.
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir
        self._next = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + 1.0
            self.check()

    def check(self) -> None:
        try:
            free = shutil.disk_usage(self.experiment_dir).free
        except OSError:  # not created yet, or not a local path
            return
        if free < STORAGE_RESERVE:
            raise no_space(self.experiment_dir)


class Tracking(tune.Callback):
    """Forwards Tune's trial events to the tracker, on the driver (trials never talk to MLflow),
    and calls `on_setting_start(name)` as each of a setting's trials starts.

    The tracker never raises (an MLflow outage only leaves it behind, and `sync` catches up from
    the journals). Tune pickles its callbacks with the experiment; the copy it keeps is never
    used (a resume builds a new experiment), so the live tracker and hook stay out of it.
    """

    def __init__(
        self,
        max_epochs: int,
        tracker: Any = None,
        on_setting_start: Callable[[str], None] | None = None,
    ) -> None:
        self.max_epochs = max_epochs
        self.tracker = tracker
        self.on_setting_start = on_setting_start

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracker": None, "on_setting_start": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.on_setting_start:
            self.on_setting_start(trial.config[SETTING])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any):
        if self.tracker:
            config = trial.config
            self.tracker.on_result(config[SETTING], config[TRIAL], sampled(config), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracker:
            last = trial.last_result
            record = TrialRecord(
                trial.config[SETTING], trial.config[TRIAL], {}, [last] if last else []
            )
            status = record.status(self.max_epochs, True)
            self.tracker.on_trial_end(trial.config[SETTING], trial.config[TRIAL], status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracker:
            self.tracker.on_trial_end(trial.config[SETTING], trial.config[TRIAL], "failed")
