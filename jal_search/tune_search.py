"""What Tune runs a search with: one searcher and one scheduler per noise setting.

Part of the Ray adapter (`tune_adapter` and the `tune_*` modules, the only ones that import Ray).
Each setting's study and promotion rule are `studies`' (Ray-free, shared with `local_search`).

- `BySetting`: Tune's `Searcher` over the settings' `SettingSearch`es, suggesting setting after
  setting;
- `SchedulerBySetting`: one ASHA, successive-halving, paused-halving or FIFO scheduler per
  setting, on the trials' own `epoch`. A trial paused at a rung ends its Tune trial; its setting's
  search hands it out again, as a new Tune trial under its own name, once the rule lets it go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from jal_search.experiment import SETTING, TRIAL
from jal_search.spec import SearchSpec, SettingPlan
from jal_search.studies import (
    METRIC,
    MODE,
    SettingSearch,
    SuccessiveHalving,
    setting_searches,
    trial_name,
    trial_number,
    unfinished,
)


class BySetting(Searcher):
    """Tune's searcher: each setting's `SettingSearch` in turn (the next setting's trials once
    the previous one has handed out all of its own), each config tagged with its SETTING and its
    TRIAL name; results and ends go back to the setting's study."""

    def __init__(self, searches: dict[str, SettingSearch]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.searches = searches
        self._trials: dict[str, tuple[str, int]] = {}  # Tune's trial id → (setting, number)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec):
        return True  # each setting's search was built with its own space, metric and mode

    def suggest(self, trial_id: str) -> dict | str | None:
        for name, search in self.searches.items():
            chosen = search.next()
            if chosen is None:
                continue
            number, config = chosen
            self._trials[trial_id] = (name, number)
            return {**config, SETTING: name, TRIAL: trial_name(number)}
        if any(search.waiting() for search in self.searches.values()):
            return None  # a paused trial may yet go on: ask again later
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        name, number = self._trials[trial_id]
        if isinstance(result.get(METRIC), float) and "epoch" in result:
            self.searches[name].report(number, int(result["epoch"]), result[METRIC])

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        name, number = self._trials.pop(trial_id)
        if error:
            self.searches[name].drop(number)
        else:
            self.searches[name].tell(number, result)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: each setting's study is on disk already, and resume opens it."""

    def restore(self, checkpoint_path: str) -> None:
        """Never called: a resume builds a new Tune experiment over the same studies."""

    def unfinished(self) -> int:
        """Trials still to run or to finish, over every setting."""
        return unfinished(self.searches)

    def paused_at(self, setting: str, trial: str, epoch: int) -> bool:
        """Whether a trial was paused at this epoch (its Tune trial ended, the trial did not)."""
        return self.searches[setting].paused_at(trial_number(trial), epoch)

    def take_stopped(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(setting, trial, last row) of the paused trials their rule stopped since last asked."""
        return [
            (name, trial_name(number), last)
            for name, search in self.searches.items()
            for number, last in search.take_stopped()
        ]


def by_setting(
    spec: SearchSpec, plans: Sequence[SettingPlan], experiment_dir: Path, counts: dict[str, int]
) -> BySetting:
    """The search's searcher: each setting's own `SettingSearch`, `counts[name]` trials each."""
    return BySetting(setting_searches(spec, plans, experiment_dir, counts))


class SchedulerBySetting(FIFOScheduler):
    """One scheduler per noise setting (ASHA's rungs compare trials of one setting only);
    Tune's choice of the next trial to run is FIFO's, whatever the setting."""

    def __init__(self, schedulers: dict[str, TrialScheduler]) -> None:
        super().__init__()
        self._schedulers = schedulers

    def _of(self, trial: Trial) -> TrialScheduler:
        return self._schedulers[trial.config[SETTING]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        for scheduler in self._schedulers.values():
            scheduler.set_search_properties(metric, mode, **spec)
        return True

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{n}: {s.debug_string()}" for n, s in self._schedulers.items())


def scheduler_by_setting(spec: SearchSpec, searcher: BySetting) -> SchedulerBySetting:
    return SchedulerBySetting({n: _scheduler(spec, s) for n, s in searcher.searches.items()})


def _scheduler(spec: SearchSpec, search: SettingSearch) -> Any:
    if spec.scheduler.type == "none":
        return FIFOScheduler()
    if spec.scheduler.type == "paused_halving":
        return PausedHalvingScheduler(search)
    grace, rf = spec.scheduler.grace_period, spec.scheduler.reduction_factor
    if spec.scheduler.type == "successive_halving":
        return SuccessiveHalvingScheduler(grace, rf)
    # On the trials' own epoch, not Tune's report count: a trial resumed from its checkpoint
    # reports its next epoch first.
    return ASHAScheduler(
        time_attr="epoch", max_t=spec.budget.epochs, grace_period=grace, reduction_factor=rf
    )


class SuccessiveHalvingScheduler(FIFOScheduler):
    """Tune's scheduler for one setting with `SuccessiveHalving`'s decisions (val_acc, max)."""

    def __init__(self, grace: int, reduction_factor: float) -> None:
        super().__init__()
        self.rule = SuccessiveHalving(grace, reduction_factor)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if "epoch" not in result or not isinstance(result.get(METRIC), float):
            return TrialScheduler.CONTINUE
        go_on = self.rule.goes_on(trial.trial_id, int(result["epoch"]), result[METRIC])
        return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP

    def debug_string(self) -> str:
        judged = ", ".join(f"{n} at epoch {e}" for e, n in self.rule.judged().items())
        return f"successive halving (Optuna's rule): trials judged {judged or 'at no rung yet'}"


class PausedHalvingScheduler(FIFOScheduler):
    """Tune's scheduler for one setting with its search's `PausedHalving` verdicts: a trial the
    rule stops or pauses is stopped (the searcher's `tell` then parks a paused one)."""

    def __init__(self, search: SettingSearch) -> None:
        super().__init__()
        self.search = search

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if "epoch" not in result or not isinstance(result.get(METRIC), float):
            return TrialScheduler.CONTINUE
        number = trial_number(trial.config[TRIAL])
        verdict = self.search.judge(number, int(result["epoch"]), result[METRIC])
        return TrialScheduler.CONTINUE if verdict == "go" else TrialScheduler.STOP

    def debug_string(self) -> str:
        rule = self.search.rule
        paused = len(rule.paused()) if rule else 0
        return f"paused halving: {paused} trial(s) paused at a rung"
