"""What Tune tells the driver as a search runs, and what the driver keeps from it.

Part of the Ray adapter (`tune_adapter` and the `tune_*` modules, the only ones that import Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray import tune

from jal_search.experiment import SETTING, TRIAL, check_space, ended_status, sampled


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
        check_space(self.experiment_dir)


class Tracking(tune.Callback):
    """Forwards Tune's trial events to the tracker, on the driver (trials never talk to MLflow),
    and calls `on_setting_start(name)` as each of a setting's trials starts. A Tune trial that
    ended where its rule paused it (`searcher.paused_at`) leaves its trial going; one the rule
    stopped while paused has ended.

    The tracker never raises (an MLflow outage only leaves it behind, and `sync` catches up from
    the journals). Tune pickles its callbacks with the experiment; the copy it keeps is never
    used (a resume builds a new experiment), so the live tracker and hook stay out of it.
    """

    def __init__(
        self,
        max_epochs: int,
        tracker: Any = None,
        on_setting_start: Callable[[str], None] | None = None,
        searcher: Any = None,
    ) -> None:
        self.max_epochs = max_epochs
        self.tracker = tracker
        self.on_setting_start = on_setting_start
        self.searcher = searcher  # tune_search.BySetting

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracker": None, "on_setting_start": None, "searcher": None}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        for setting, trial, last in self.searcher.take_stopped() if self.searcher else []:
            self._end(setting, trial, last)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.on_setting_start:
            self.on_setting_start(trial.config[SETTING])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any):
        if self.tracker:
            config = trial.config
            self.tracker.on_result(config[SETTING], config[TRIAL], sampled(config), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        setting, name, last = trial.config[SETTING], trial.config[TRIAL], trial.last_result
        epoch = int((last or {}).get("epoch", 0))
        if not (self.searcher and self.searcher.paused_at(setting, name, epoch)):
            self._end(setting, name, last)

    def _end(self, setting: str, trial: str, last: dict[str, Any] | None) -> None:
        if self.tracker:
            status = ended_status(last, self.max_epochs)
            self.tracker.on_trial_end(setting, trial, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracker:
            self.tracker.on_trial_end(trial.config[SETTING], trial.config[TRIAL], "failed")
