"""What Tune runs a search with: one searcher and one scheduler per noise setting.

Part of the Ray adapter (`tune_adapter` and the `tune_*` modules, the only ones that import Ray):

- `by_setting` suggests trials setting after setting, each from its setting's own searcher
  (`JalOptunaSearch`: Optuna TPE; `Listed`: a grid, seeded random samples or packs);
- `scheduler_by_setting` gives each setting its own ASHA (or FIFO), and puts each trial's folder
  under its setting's.
"""

from __future__ import annotations

import base64
import json
import os
import random
import tempfile
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from jal_search.experiment import MEMBERS, SETTING
from jal_search.spec import (
    Param,
    SearchSpec,
    SettingPlan,
    fixed_configs,
    packs,
    trials_per_setting,
)
from jal_search.tune_callbacks import DRIVER

METRIC, MODE = "val_acc", "max"


class BySetting(Searcher):
    """One searcher per noise setting behind Tune's single one.

    Trials are suggested setting after setting (the next setting's first once the previous one
    has suggested all of its `counts`), each config tagged with its SETTING; results go back to
    the searcher that suggested the trial.
    """

    def __init__(self, searchers: dict[str, Searcher], counts: dict[str, int]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self._searchers = searchers
        self._left = dict(counts)
        self._setting_of: dict[str, str] = {}
        # Each setting's searcher state as last saved (base64). Tune saves after every step;
        # only the settings whose searcher changed since are saved again.
        self._saved: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec):
        return True  # each setting's searcher was built with its own space, metric and mode

    def suggest(self, trial_id: str) -> dict | str | None:
        name = next((n for n, left in self._left.items() if left > 0), None)
        if name is None:
            return Searcher.FINISHED
        config = self._searchers[name].suggest(trial_id)
        self._saved.pop(name, None)
        if not isinstance(config, dict):
            return config  # the setting's searcher has nothing now (None) or is finished
        self._left[name] -= 1
        self._setting_of[trial_id] = name
        return {**config, SETTING: name}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        name = self._setting_of[trial_id]
        self._searchers[name].on_trial_result(trial_id, result)
        self._saved.pop(name, None)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        name = self._setting_of[trial_id]
        self._searchers[name].on_trial_complete(trial_id, result, error)
        self._saved.pop(name, None)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Tune's save, and where: Tune tells the searcher (not the callbacks) the folder and
        session name it saves its state under; `tune_callbacks.BackUpState` copies it from there."""
        super().save_to_dir(checkpoint_dir, session_str)
        DRIVER.update(staging=checkpoint_dir, session=session_str)

    def save(self, checkpoint_path: str) -> None:
        """One JSON file: the suggestion bookkeeping and each setting's own saved state."""
        with tempfile.TemporaryDirectory(prefix="jal-searcher-") as directory:
            for name, searcher in self._searchers.items():
                if name not in self._saved:
                    searcher.save(os.path.join(directory, "state"))
                    raw = Path(directory, "state").read_bytes()
                    self._saved[name] = base64.b64encode(raw).decode()
        state = {"left": self._left, "setting_of": self._setting_of, "searchers": self._saved}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self._left, self._setting_of = state["left"], state["setting_of"]
        self._saved = state["searchers"]
        with tempfile.TemporaryDirectory(prefix="jal-searcher-") as directory:
            for name, searcher in self._searchers.items():
                Path(directory, "state").write_bytes(base64.b64decode(self._saved[name]))
                searcher.restore(os.path.join(directory, "state"))


def by_setting(spec: SearchSpec, plans: Sequence[SettingPlan]) -> BySetting:
    """The search's searcher: each setting's own (`_searcher`), `trial_count` trials each."""
    return BySetting(
        {p.name: _searcher(spec, p) for p in plans}, {p.name: trial_count(spec, p) for p in plans}
    )


class Listed(Searcher):
    """Configs chosen up front (a grid, seeded random samples, packs), in order."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self._configs = list(configs)

    def suggest(self, trial_id: str) -> dict | str | None:
        return self._configs.pop(0) if self._configs else Searcher.FINISHED

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self._configs))

    def restore(self, checkpoint_path: str) -> None:
        self._configs = json.loads(Path(checkpoint_path).read_text())

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Configs chosen up front learn nothing from results."""


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
        _nest_under_setting(trial)
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


def _nest_under_setting(trial: Trial) -> None:
    """Put the trial's folder at `<experiment>/<setting>/<trial id>`.

    Tune refuses a '/' in a `trial_dirname_creator` name, but keeps a relative folder already set
    when it first makes the folder (`Trial.init_local_path`, at the trial's start); Tune calls the
    scheduler's `on_trial_add` before that, for new and restored trials alike.
    """
    if not trial.relative_logdir:
        trial.relative_logdir = f"{trial.config[SETTING]}/{trial.trial_id}"
        trial.storage.trial_dir_name = trial.relative_logdir
        trial.invalidate_json_state()


def trial_count(spec: SearchSpec, plan: SettingPlan) -> int:
    """How many trials a setting runs: its packs, or its share of the budget (at most the size of
    a finite space)."""
    return len(packs(spec, plan)) if spec.pack > 1 else trials_per_setting(spec, plan.space)


def _distribution(p: Param) -> Any:
    if p.loguniform is not None:
        return tune.loguniform(*p.loguniform)
    if p.uniform is not None:
        return tune.uniform(*p.uniform)
    return tune.choice(p.choice)


class JalOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended, and never trains a config twice.

    Ray's OptunaSearch reports a trial stopped early by ASHA as COMPLETE with its early score, so
    TPE would treat an epoch-2 accuracy like a finished one. Here such a trial is PRUNED (Optuna
    then ranks it by its last intermediate value, below finished trials), and a diverged trial
    is FAIL, so neither steers the sampler like a finished result.

    On a finite space (every parameter a `choice`) TPE keeps proposing the configs that did well,
    and each repeat clears every ASHA rung again: benchmarks/asha_efficiency.py measured 0.255 of
    the grid's epochs with repeats, 0.132 without. A repeated draw is told its twin's outcome (so
    TPE learns nothing false) and TPE draws again; after `REDRAWS` repeats a seeded random untried
    config runs. `trial_count` caps such a search at the space's size, so one is always left.
    """

    REDRAWS = 20

    def __init__(self, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_epochs = max_epochs

    def suggest(self, trial_id: str) -> dict | None:
        choices = self._finite_choices()
        if choices is None:  # a range: draws never repeat
            return super().suggest(trial_id)
        for _ in range(self.REDRAWS):
            config = super().suggest(trial_id)
            twin = self._twin(self._ot_trials[trial_id])
            if twin is None:
                return config
            self._tell_like(self._ot_trials.pop(trial_id), twin)
        untried = self._untried(choices)
        if untried:
            rng = random.Random(f"{self._seed}-{len(self._ot_study.trials)}")
            self._ot_study.enqueue_trial(rng.choice(untried))
        return super().suggest(trial_id)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if result and not error:
            if result.get("diverged", 0.0) >= 1.0:
                result, error = None, True
            elif result.get("training_iteration", 0) < self._max_epochs:
                result = None  # no value and no error: Optuna records PRUNED
        super().on_trial_complete(trial_id, result, error)

    def _finite_choices(self) -> dict[str, list] | None:
        if not isinstance(self._space, dict) or not all(
            isinstance(d, CategoricalDistribution) for d in self._space.values()
        ):
            return None
        return {k: list(d.choices) for k, d in self._space.items()}

    def _twin(self, drawn: Any) -> FrozenTrial | None:
        """An earlier trial (running or ended) with the same config as the `drawn` one."""
        return next(
            (
                t
                for t in self._ot_study.get_trials(deepcopy=False)
                if t.number != drawn.number and t.params and t.params == drawn.params
            ),
            None,
        )

    def _tell_like(self, drawn: Any, twin: FrozenTrial) -> None:
        for step, value in twin.intermediate_values.items():
            drawn.report(value, step)
        if twin.state == TrialState.COMPLETE:
            self._ot_study.tell(drawn, twin.value)
        else:  # a twin still running counts as pruned at its latest epoch
            failed = twin.state == TrialState.FAIL
            self._ot_study.tell(drawn, state=TrialState.FAIL if failed else TrialState.PRUNED)

    def _untried(self, choices: dict[str, list]) -> list[dict[str, Any]]:
        tried = {tuple(sorted(t.params.items())) for t in self._ot_study.get_trials(deepcopy=False)}
        configs = (dict(zip(choices, values, strict=True)) for values in product(*choices.values()))
        return [c for c in configs if tuple(sorted(c.items())) not in tried]


def _searcher(spec: SearchSpec, plan: SettingPlan) -> Searcher:
    """One setting's searcher: TPE over its space, or the configs chosen up front."""
    if spec.pack > 1:
        return Listed([{MEMBERS: p} for p in packs(spec, plan)])
    if spec.searcher.type == "optuna" and plan.space:
        return JalOptunaSearch(
            spec.budget.epochs,
            space=OptunaSearch.convert_search_space(
                {k: _distribution(p) for k, p in plan.space.items()}
            ),
            metric=METRIC,
            mode=MODE,
            points_to_evaluate=plan.points_to_evaluate or None,
            seed=spec.searcher.seed,
        )
    return Listed(fixed_configs(spec, plan)[: trial_count(spec, plan)])


def scheduler_by_setting(spec: SearchSpec, plans: Sequence[SettingPlan]) -> SchedulerBySetting:
    return SchedulerBySetting({p.name: _scheduler(spec) for p in plans})


def _scheduler(spec: SearchSpec) -> Any:
    if spec.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.budget.epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )
