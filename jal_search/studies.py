"""Each noise setting's search, without Ray: its Optuna study and its promotion rule.

Shared by both ways a search runs (`tune_search` under Ray Tune, `local_search` in this process).

Each setting's trials are an Optuna study, asked and told through Optuna's public API and kept in
Optuna's own storage, `<experiment>/<setting>/optuna.journal` (appended at every ask, report and
tell). That study is the searcher's whole state: a run, a resume after a kill, or `extend` opens
it and carries on, so no other state file is needed. Trials asked but not told (running when the
driver died, or finally failed) are handed out again, under their own name, before any new one:
their journals and checkpoints are found, nothing is rerun, nothing replaced.

- `SettingSearch`: one setting's study: TPE over the space (the paper's configs first, never one
  config twice, early-stopped trials told PRUNED, diverged ones FAIL, seeded), or configs chosen
  up front (grid, seeded random samples) recorded in the same kind of study;
- `SuccessiveHalving`: Optuna's promotion rule on the trials' epochs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from jal_search.metrics import SELECTION
from jal_search.spec import Param, SearchSpec, SettingPlan, fixed_configs, with_trials

METRIC, MODE = SELECTION, "max"
STUDY_FILE = "optuna.journal"  # neither .json nor .pkl: Tune never copies it around
CONFIG_ATTR, TWIN_ATTR = "jal.config", "jal.twin_of"

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial would drown the table


def trial_name(number: int) -> str:
    """A trial's name (and folder) from its number in the setting's study."""
    return f"t{number:05d}"


class SettingSearch:
    """One noise setting's trials, recorded in its Optuna study.

    `space` set: TPE (seeded) draws configs; the plan's `points_to_evaluate` are enqueued first
    (once: a point already in the study is not queued again). On a finite space a repeated draw
    is told its twin's outcome (so TPE learns nothing false) and TPE draws again; after REDRAWS
    repeats a seeded random untried config runs (benchmarks/asha_efficiency.py: 0.255 of the
    grid's epochs with repeats, 0.132 without). `listed` set instead: those configs, in order (a
    grid, random samples).

    `count` trials in all (twins not counted). The study lives in `folder/STUDY_FILE`; opened
    again (resume, extend) it hands out its unfinished trials first.
    """

    REDRAWS = 20

    def __init__(
        self,
        folder: Path,
        count: int,
        max_epochs: int,
        seed: int,
        space: dict[str, BaseDistribution] | None = None,
        first: Sequence[dict[str, Any]] = (),
        listed: Sequence[dict[str, Any]] | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
    ) -> None:
        self.folder, self.count, self.max_epochs, self.seed = folder, count, max_epochs, seed
        self.space, self.first, self.listed = space, list(first), listed
        self.sampler = sampler  # None: TPE, seeded
        self._study: optuna.Study | None = None
        self._asked = 0  # trials asked so far, twins not counted
        # Trials handed out and not yet told; None for one handed out again (told by number).
        self._running: dict[int, optuna.Trial | None] = {}
        self._unfinished: list[FrozenTrial] = []  # asked by an earlier run and never told
        self._reported: dict[int, int] = {}  # the last epoch reported per running trial

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher with the experiment; the study is reopened from its file.
        return {**self.__dict__, "_study": None, "_running": {}, "_unfinished": [], "_reported": {}}

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            _repair(self.folder / STUDY_FILE)
            storage = JournalStorage(JournalFileBackend(str(self.folder / STUDY_FILE)))
            summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
            past = sum(s.n_trials for s in summaries)
            # Seeded by the trials so far too: a reopened study never repeats its first draws.
            tpe = optuna.samplers.TPESampler(seed=hash((self.seed, past)) % 2**32)
            self._study = optuna.create_study(
                storage=storage,
                sampler=self.sampler or tpe,
                study_name="jal",
                direction="maximize",
                load_if_exists=True,
            )
            if self.space is not None:
                for point in self.first:  # once: a point already in the study is not queued again
                    self._study.enqueue_trial(point, skip_if_exists=True)
            trials = self._study.get_trials(deepcopy=False)
            for t in trials:  # asked, but the driver died before handing it out: nothing trained
                if t.state == TrialState.RUNNING and CONFIG_ATTR not in t.user_attrs:
                    self._study.tell(t.number, state=TrialState.FAIL)
            handed = [t for t in trials if CONFIG_ATTR in t.user_attrs]
            self._unfinished = [t for t in handed if t.state == TrialState.RUNNING]
            self._asked = len(handed)
        return self._study

    def asked(self) -> int:
        """Trials handed out so far (recorded with their config; twins are not)."""
        if not self._started():
            return 0
        self.study  # noqa: B018 - opening the study counts them
        return self._asked

    def next(self) -> tuple[int, dict[str, Any]] | None:
        """(number, config) of the trial to run next: an unfinished one, else a new one; None
        when all `count` are asked."""
        self.study  # noqa: B018 - opening it lists the trials an earlier run left unfinished
        if self._unfinished:  # each handed out once
            again = self._unfinished.pop(0)
            self._running[again.number] = None
            return again.number, again.user_attrs[CONFIG_ATTR]
        if self.asked() >= self.count:
            return None
        trial = self._ask()
        config = dict(trial.params) if self.listed is None else self.listed[self._asked]
        trial.set_user_attr(CONFIG_ATTR, config)  # handed out from here on
        self._asked += 1
        self._running[trial.number] = trial
        return trial.number, config

    def report(self, number: int, epoch: int, value: float) -> None:
        """An epoch's score, for Optuna's ranking of pruned trials. Not for a trial handed out
        again: Optuna reports through the asking `Trial` only (it keeps its earlier scores)."""
        trial = self._running.get(number)
        # Optuna refuses NaN intermediate values, and warns of a step reported twice.
        if trial is not None and value == value and epoch > self._reported.get(number, 0):
            trial.report(value, epoch)
            self._reported[number] = epoch

    def tell(self, number: int, last: dict[str, Any] | None) -> None:
        """Record how a trial ended from its last row: COMPLETE (its full budget), PRUNED (ASHA
        stopped it: Optuna ranks it by its last intermediate value, below finished trials), or
        FAIL (diverged, or no epoch at all)."""
        if number not in self._running:
            return
        value = (last or {}).get(METRIC)
        if last and "epoch" in last and isinstance(value, float):
            # Tune gives a stopped trial's last result to the scheduler and the end, not here.
            self.report(number, int(last["epoch"]), value)
        trial = self._running.pop(number) or number
        self._reported.pop(number, None)
        if not last or last.get("diverged", 0.0) >= 1.0 or value is None or value != value:
            self.study.tell(trial, state=TrialState.FAIL)
        elif last.get("epoch", 0) < self.max_epochs:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, value)

    def drop(self, number: int) -> None:
        """Forget a trial Tune finally failed: it stays unfinished in the study, and the next
        resume hands it out again (from its checkpoint)."""
        self._running.pop(number, None)
        self._reported.pop(number, None)

    def unfinished(self) -> int:
        """Trials asked and not told, as the study file holds them now."""
        if not self._started():
            return 0
        return sum(
            1 for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING
        )

    def _started(self) -> bool:
        """Whether the setting has a study yet (a setting not started leaves no folder)."""
        return self._study is not None or (self.folder / STUDY_FILE).is_file()

    def _ask(self) -> optuna.Trial:
        if self.space is None:
            return self.study.ask()
        choices = self._finite_choices()
        for _ in range(self.REDRAWS if choices else 1):
            trial = self.study.ask(self.space)
            twin = self._twin(trial)
            if twin is None:
                return trial
            self._tell_like(trial, twin)
        untried = self._untried(choices or {})
        if untried:
            rng = random.Random(f"{self.seed}-{len(self.study.trials)}")
            self.study.enqueue_trial(rng.choice(untried))
        return self.study.ask(self.space)

    def _handed(self) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False) if CONFIG_ATTR in t.user_attrs]

    def _finite_choices(self) -> dict[str, list] | None:
        space = self.space or {}
        if not all(isinstance(d, CategoricalDistribution) for d in space.values()):
            return None
        return {k: list(d.choices) for k, d in space.items()}

    def _twin(self, drawn: optuna.Trial) -> FrozenTrial | None:
        """A trial handed out earlier (running or ended) with the same config as the `drawn` one."""
        return next(
            (t for t in self._handed() if t.number != drawn.number and t.params == drawn.params),
            None,
        )

    def _tell_like(self, drawn: optuna.Trial, twin: FrozenTrial) -> None:
        drawn.set_user_attr(TWIN_ATTR, twin.number)
        for step, value in twin.intermediate_values.items():
            drawn.report(value, step)
        if twin.state == TrialState.COMPLETE:
            self.study.tell(drawn, twin.value)
        else:  # a twin still running counts as pruned at its latest epoch
            failed = twin.state == TrialState.FAIL
            self.study.tell(drawn, state=TrialState.FAIL if failed else TrialState.PRUNED)

    def _untried(self, choices: dict[str, list]) -> list[dict[str, Any]]:
        tried = {tuple(sorted(t.params.items())) for t in self._handed()}
        configs = (dict(zip(choices, values, strict=True)) for values in product(*choices.values()))
        return [c for c in configs if tuple(sorted(c.items())) not in tried]


def _repair(path: Path) -> None:
    """Make a study file a killed driver left readable again: drop a half-written last line
    (Optuna would fail on the line appended after it) and the lock file left held (Optuna would
    wait for it to go stale). Only the driver, under the experiment's lock, writes the file."""
    Path(f"{path}.lock").unlink(missing_ok=True)
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def setting_searches(
    spec: SearchSpec, plans: Sequence[SettingPlan], experiment_dir: Path, counts: dict[str, int]
) -> dict[str, SettingSearch]:
    """Each setting's own `SettingSearch`, `counts[name]` trials each, in the plans' order."""
    return {p.name: _search(spec, p, experiment_dir / p.name, counts[p.name]) for p in plans}


def unfinished(searches: dict[str, SettingSearch]) -> int:
    """Trials still to run or to finish, over every setting."""
    return sum(s.unfinished() + max(s.count - s.asked(), 0) for s in searches.values())


def _search(spec: SearchSpec, plan: SettingPlan, folder: Path, count: int) -> SettingSearch:
    """One setting's search: TPE over its space, or the configs chosen up front."""
    common = {"count": count, "max_epochs": spec.budget.epochs, "seed": spec.searcher.seed}
    if spec.searcher.type == "optuna" and plan.space:
        space = {k: _distribution(p) for k, p in plan.space.items()}
        return SettingSearch(folder, space=space, first=plan.points_to_evaluate, **common)
    return SettingSearch(folder, listed=fixed_configs(with_trials(spec, count), plan), **common)


def _distribution(p: Param) -> BaseDistribution:
    if p.loguniform is not None:
        return FloatDistribution(*p.loguniform, log=True)
    if p.uniform is not None:
        return FloatDistribution(*p.uniform)
    return CategoricalDistribution(p.choice if p.choice is not None else [p.fixed])


class SuccessiveHalving:
    """Optuna's successive-halving promotion rule (`SuccessiveHalvingPruner`, bootstrap count 0),
    decision for decision, on the trials' epochs.

    Rung k is at epoch grace·rf^k. A trial reaching it records its value there, then goes on only
    if that value is among the best ⌊n/rf⌋ of the n values recorded at the rung so far (its own
    included) — while n < rf, only if it is the best of them. A NaN score stops it. A trial past
    several rungs at once (one resumed mid-way) is judged at each in turn.
    """

    def __init__(self, grace: int, reduction_factor: float) -> None:
        self.grace, self.rf = grace, reduction_factor
        self._values: dict[int, list[float]] = {}  # rung → the values recorded there
        self._rung: dict[str, int] = {}  # trial → its next rung

    def judged(self) -> dict[int, int]:
        """Per rung's epoch, how many trials were judged there."""
        return {math.ceil(self.grace * self.rf**k): len(v) for k, v in sorted(self._values.items())}

    def goes_on(self, trial: str, epoch: int, value: float) -> bool:
        rung = self._rung.get(trial, 0)
        while epoch >= self.grace * self.rf**rung:
            if value != value:
                return False
            recorded = self._values.setdefault(rung, [])
            recorded.append(value)
            self._rung[trial] = rung + 1
            best = sorted(recorded, reverse=True)[max(int(len(recorded) // self.rf) - 1, 0)]
            if value < best:
                return False
            rung += 1
        return True
