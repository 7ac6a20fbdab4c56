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
- `SuccessiveHalving`: Optuna's promotion rule on the trials' epochs;
- `PausedHalving`: successive halving judged on whole rungs, its waiting trials paused (parked
  unfinished in the study by `SettingSearch`, handed out again once decided).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any, Literal

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
from jal_search.spec import (
    Param,
    Scheduler,
    SearchSpec,
    SettingPlan,
    fixed_configs,
    with_trials,
)

METRIC, MODE = SELECTION, "max"
STUDY_FILE = "optuna.journal"  # neither .json nor .pkl: Tune never copies it around
CONFIG_ATTR, TWIN_ATTR = "jal.config", "jal.twin_of"
Verdict = Literal["go", "stop", "pause"]  # a promotion rule's, on a trial's epoch

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial would drown the table


def trial_name(number: int) -> str:
    """A trial's name (and folder) from its number in the setting's study."""
    return f"t{number:05d}"


def trial_number(name: str) -> int:
    """`trial_name`'s inverse."""
    return int(name[1:])


class SettingSearch:
    """One noise setting's trials, recorded in its Optuna study.

    `space` set: TPE (seeded) draws configs; the plan's `points_to_evaluate` are enqueued first
    (once: a point already in the study is not queued again) — last under paused halving, where
    they run their whole budget beside the trials the rule promotes at the setting's end. On a
    finite space a repeated draw is told its twin's outcome (so TPE learns nothing false) and TPE
    draws again; after REDRAWS repeats a seeded random untried config runs
    (benchmarks/asha_efficiency.py: 0.255 of the grid's epochs with repeats, 0.132 without).
    `listed` set instead: those configs, in order (a grid, random samples).

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
        halving: tuple[int, float] | None = None,
    ) -> None:
        self.folder, self.count, self.max_epochs, self.seed = folder, count, max_epochs, seed
        self.space, self.first, self.listed = space, list(first), listed
        self.sampler = sampler  # None: TPE, seeded
        self.halving = halving  # (grace, rf) of `PausedHalving`, which `judge` then applies
        self.rule: PausedHalving | None = None  # built with the study, from what it holds
        self._exempt: set[int] = set()  # trials of the `first` configs: never stopped
        self._pausing: set[int] = set()  # paused by `judge`, their run not yet ended (told)
        self._pauses: set[tuple[int, int]] = set()  # (trial, epoch) of every pause in this run
        self._parked: dict[int, dict[str, Any]] = {}  # paused at a rung: number → last row
        self._verdicts: dict[int, bool] = {}  # the rule's decisions on paused trials, to apply
        self._ready: list[int] = []  # paused trials the rule let go on, handed out first
        self._stopped: list[tuple[int, dict[str, Any]]] = []  # paused ones it stopped, not taken
        self._study: optuna.Study | None = None
        self._asked = 0  # trials asked so far, twins not counted
        self._running: dict[int, optuna.Trial] = {}  # trials handed out and not yet told
        self._unfinished: list[FrozenTrial] = []  # asked by an earlier run and never told
        self._reported: dict[int, int] = {}  # the last epoch reported per running trial

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher with the experiment; the study is reopened from its file.
        live = {"_study": None, "rule": None, "_running": {}, "_unfinished": [], "_reported": {}}
        paused = {"_pausing": set(), "_pauses": set(), "_parked": {}, "_verdicts": {}}
        return {**self.__dict__, **live, **paused, "_ready": []}

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
            if self.space is not None and self.halving is None:
                self._enqueue_first()
            trials = self._study.get_trials(deepcopy=False)
            for t in trials:  # asked, but the driver died before handing it out: nothing trained
                if t.state == TrialState.RUNNING and CONFIG_ATTR not in t.user_attrs:
                    self._study.tell(t.number, state=TrialState.FAIL)
            handed = [t for t in trials if CONFIG_ATTR in t.user_attrs]
            self._unfinished = [t for t in handed if t.state == TrialState.RUNNING]
            self._asked = len(handed)
            if self.halving is not None:
                self._rebuild_rule(*self.halving, handed)
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
        self._apply_verdicts()
        if self._ready:  # paused at a rung, and let go on: from its checkpoint, as it is
            number = self._ready.pop(0)
            return number, self.study.trials[number].user_attrs[CONFIG_ATTR]
        if self._unfinished:  # each handed out once
            again = self._unfinished.pop(0)
            self._reopen(again)
            return again.number, again.user_attrs[CONFIG_ATTR]
        if self.asked() >= self.count:
            return None
        if self.halving is not None and self.count - self._asked <= len(self.first):
            self._enqueue_first()  # last: beside the trials the rule promoted, no slot idles
        trial = self._ask()
        config = dict(trial.params) if self.listed is None else self.listed[self._asked]
        trial.set_user_attr(CONFIG_ATTR, config)  # handed out from here on
        if self._is_first(config):
            self._exempt.add(trial.number)
        self._asked += 1
        self._running[trial.number] = trial
        return trial.number, config

    def report(self, number: int, epoch: int, value: float) -> None:
        """An epoch's score, for Optuna's ranking of pruned trials and for the rule's rebuild
        when the study is reopened."""
        trial = self._running.get(number)
        # Optuna refuses NaN intermediate values, and warns of a step reported twice.
        if trial is not None and value == value and epoch > self._reported.get(number, 0):
            trial.report(value, epoch)
            self._reported[number] = epoch

    def tell(self, number: int, last: dict[str, Any] | None) -> None:
        """Record how a trial's run ended from its last row: COMPLETE (its full budget), PRUNED
        (stopped early: Optuna ranks it by its last intermediate value, below finished trials),
        or FAIL (diverged, or no epoch at all). A trial `judge` paused waits instead: it stays
        unfinished in the study, `next` hands it out again (to go on from its checkpoint) once
        the rule lets it, and one the rule stops there is told PRUNED then (`take_stopped`)."""
        if number not in self._running:
            return
        if number in self._pausing and last:
            self._pausing.remove(number)
            self._parked[number] = last
            self._apply_verdicts()
            return
        if self.rule is not None and number not in self._exempt:
            self.rule.ended(number)  # nothing if the rule stopped it
        value = (last or {}).get(METRIC)
        if last and "epoch" in last and isinstance(value, float):
            # Tune gives a stopped trial's last result to the scheduler and the end, not here.
            self.report(number, int(last["epoch"]), value)
        trial = self._running.pop(number)
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
        if self.rule is not None and number not in self._exempt:
            self.rule.ended(number)

    def judge(self, number: int, epoch: int, value: float) -> Verdict:
        """Whether a trial goes on after this epoch, stops, or pauses at a rung (`tell` then
        parks it): `PausedHalving`'s verdict with `halving` set, else "go". The
        `first` configs (the paper's) always run their whole budget, as the reference the search
        is measured against."""
        if self.rule is None or number in self._exempt:
            return "go"
        verdict = self.rule.judge(number, epoch, value)
        if verdict == "pause":
            self._pausing.add(number)
            self._pauses.add((number, epoch))
        return verdict

    def paused_at(self, number: int, epoch: int) -> bool:
        """Whether `judge` paused this trial at this epoch (its run ended there, the trial
        did not), whatever the rule has decided since."""
        return (number, epoch) in self._pauses

    def waiting(self) -> bool:
        """Whether any trial is paused (so `next` may yet hand one out again)."""
        if self._started():
            self.study  # noqa: B018 - opening it parks the trials an earlier run left paused
        return bool(self._pausing or self._parked)

    def take_stopped(self) -> list[tuple[int, dict[str, Any]]]:
        """(number, last row) of the paused trials the rule stopped since the last call."""
        out, self._stopped = self._stopped, []
        return out

    def unfinished(self) -> int:
        """Trials asked and not told, as the study file holds them now."""
        if not self._started():
            return 0
        return sum(
            1 for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING
        )

    def _apply_verdicts(self) -> None:
        if self.rule is None:
            return
        self._verdicts.update(self.rule.decided())
        for number in [n for n in self._parked if n in self._verdicts]:
            last = self._parked.pop(number)
            if self._verdicts.pop(number):
                self._ready.append(number)
            else:
                self.tell(number, last)  # PRUNED: stopped before its last epoch
                self._stopped.append((number, last))

    def _enqueue_first(self) -> None:
        for point in self.first:  # once: a point already in the study is not queued again
            self.study.enqueue_trial(point, skip_if_exists=True)

    def _is_first(self, config: dict[str, Any]) -> bool:
        return self.space is not None and any(config == point for point in self.first)

    def _rebuild_rule(self, grace: int, rf: float, handed: list[FrozenTrial]) -> None:
        """The rule as the study's trials leave it, their scores fed rung by rung (a trial is
        judged at a rung only once the rule has let it past the one before, as in the live run):
        the paused ones parked again, the stopped ones told, the ended ones out."""
        first = min(len(self.first), self.count) if self.space is not None else 0
        rule = self.rule = PausedHalving(grace, rf, self.count - first, self.max_epochs)
        judged = []
        for t in sorted(handed, key=lambda t: t.number):
            if self._is_first(t.user_attrs[CONFIG_ATTR]):
                self._exempt.add(t.number)
            else:
                judged.append(t)
        verdicts: dict[int, Verdict | None] = {t.number: "go" for t in judged}  # None: ended

        def ended(t: FrozenTrial) -> None:
            rule.ended(t.number)
            verdicts[t.number] = None

        def take_decided() -> None:  # paused trials the rule has decided since
            verdicts.update((n, "go" if goes else "stop") for n, goes in rule.decided().items())

        for epoch in rule.rungs:
            for t in judged:
                if verdicts[t.number] != "go":
                    continue
                if epoch in t.intermediate_values:
                    verdicts[t.number] = rule.judge(t.number, epoch, t.intermediate_values[epoch])
                elif t.state != TrialState.RUNNING:
                    ended(t)  # before this rung: counted out of it
            take_decided()
        for t in judged:
            if t.state != TrialState.RUNNING and verdicts[t.number] is not None:
                ended(t)
        take_decided()
        for t in judged:
            verdict = verdicts[t.number]
            if t.state != TrialState.RUNNING or verdict == "go":
                continue
            step = max(t.intermediate_values)
            last = {"epoch": step, METRIC: t.intermediate_values[step]}
            self._unfinished.remove(t)
            self._reopen(t)
            if verdict == "pause":
                self._parked[t.number] = last
            else:
                self.tell(t.number, last)
                self._stopped.append((t.number, last))

    def _reopen(self, asked: FrozenTrial) -> None:
        """Run a trial an earlier run asked for: Optuna reports only through a `Trial`, so one is
        made for it (its earlier scores are kept; a step is not reported twice)."""
        self._running[asked.number] = optuna.Trial(self.study, asked._trial_id)
        self._reported[asked.number] = max(asked.intermediate_values, default=0)

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
    s = spec.scheduler
    halving = (s.grace_period, s.reduction_factor) if s.type == "paused_halving" else None
    common = {
        "count": count,
        "max_epochs": spec.budget.epochs,
        "seed": spec.searcher.seed,
        "halving": halving,
    }
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


class PausedHalving:
    """Successive halving judged on whole rungs, pausing trials (`scheduler.type: paused_halving`).

    Rung k is at epoch ⌈grace·rf^k⌉, below the budget's last epoch. Of the trials that reach it,
    the best max(1, ⌊count/rf^(k+1)⌋) go on (`count`: the setting's trials), as synchronous
    successive halving keeps them. Optuna's rule keeps the same fraction but decides on arrival,
    so each of the first rf − 1 trials at a rung that is the best so far goes on ("Optuna does
    not support suspending or resuming ongoing trials", its pruner says); a search that
    checkpoints every epoch can pause them instead. A trial reaching a rung stops when that many
    trials have beaten it there, goes on when no later arrival can push it out, and otherwise
    pauses until one of those is true (`decided`). A NaN score stops it; a trial that ends before
    a rung for another reason (failed, diverged) is counted out of it (`ended`).
    """

    def __init__(self, grace: int, reduction_factor: float, count: int, max_epochs: int) -> None:
        schedule = Scheduler(grace_period=grace, reduction_factor=reduction_factor)
        self.rungs = sorted(set(schedule.rungs(max_epochs)))  # ⌈·⌉ may repeat one for rf near 1
        self.quota = [
            max(1, int(count // reduction_factor ** (k + 1))) for k in range(len(self.rungs))
        ]
        self.count, self.max_epochs = count, max_epochs
        self._values: list[dict[Any, float]] = [{} for _ in self.rungs]  # rung → trial → score
        self._promoted: list[set[Any]] = [set() for _ in self.rungs]
        self._out = [0] * len(self.rungs)  # trials that ended before the rung
        self._next: dict[Any, int] = {}  # trial → the next rung it meets
        self._paused: dict[Any, int] = {}  # trial → the rung it waits at
        self._decided: dict[Any, bool] = {}  # paused trials decided since the last `decided()`

    def judge(self, trial: Any, epoch: int, value: float) -> Verdict:
        """A trial's epoch: whether it goes on, stops, or pauses at the rung it reached."""
        k = self._next.get(trial, 0)
        while k < len(self.rungs) and epoch >= self.rungs[k]:
            if value != value:
                self._leave(trial, k)
                return "stop"
            self._values[k][trial] = value
            self._next[trial] = k + 1
            verdict = self._verdict(trial, k)
            if verdict != "go":
                self._next[trial] = len(self.rungs)
                if verdict == "pause":
                    self._paused[trial] = k
                self._settle()
                return verdict
            self._promoted[k].add(trial)
            k += 1
        self._settle()
        return "go"

    def ended(self, trial: Any) -> None:
        """A trial ended other than by this rule's stop: its budget, a failure, a divergence,
        or (one it paused) for good, as an earlier run's trials do when `extend` adds more."""
        if self._paused.pop(trial, None) is not None:
            self._settle()
        else:
            self._leave(trial, self._next.get(trial, 0))

    def decided(self) -> dict[Any, bool]:
        """The paused trials decided since the last call: True to go on (from the epoch they
        paused at), False to stop there."""
        out, self._decided = self._decided, {}
        return out

    def paused(self) -> set[Any]:
        return set(self._paused)

    def _leave(self, trial: Any, k: int) -> None:
        if k < len(self.rungs):
            self._out[k] += 1
            self._next[trial] = len(self.rungs)
            self._settle()

    def _verdict(self, trial: Any, k: int) -> Verdict:
        values, value = self._values[k], self._values[k][trial]
        # Ties go to the lower trial, not the earlier arrival: a rule rebuilt after a restart
        # (trials fed in number order) must decide as the live one did.
        ahead = sum(1 for t, v in values.items() if v > value or (v == value and t < trial))
        if ahead >= self.quota[k]:
            return "stop"
        return "go" if ahead + self._to_come(k) < self.quota[k] else "pause"

    def _to_come(self, k: int) -> int:
        """How many more trials may still reach rung k (an upper bound while k − 1 is open)."""
        if k == 0:
            reach = self.count
        elif self._to_come(k - 1) or any(r == k - 1 for r in self._paused.values()):
            reach = self.quota[k - 1]
        else:
            reach = len(self._promoted[k - 1])
        return max(reach - len(self._values[k]) - self._out[k], 0)

    def _settle(self) -> None:
        """Decide the paused trials that later arrivals (or departures) have decided."""
        changed = True
        while changed:
            changed = False
            for trial, k in list(self._paused.items()):
                verdict = self._verdict(trial, k)
                if verdict == "pause":
                    continue
                del self._paused[trial]
                self._decided[trial] = verdict == "go"
                if verdict == "go":
                    self._promoted[k].add(trial)
                    self._next[trial] = k + 1
                changed = True
