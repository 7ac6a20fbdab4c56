"""The Ray adapter: its private Ray's trial processes; its searcher on real Optuna studies."""

import ast
import math
import random
import warnings
from pathlib import Path

import optuna
import pytest
import ray
import scripted
from optuna.distributions import CategoricalDistribution, FloatDistribution

from jal_search import local_search, tune_adapter
from jal_search.experiment import read_trials
from jal_search.spec import parse_spec, plan, trials_per_setting
from jal_search.studies import (
    STUDY_FILE,
    TWIN_ATTR,
    SettingSearch,
    SuccessiveHalving,
    trial_name,
)


def test_trial_processes_start_with_the_trial_environment():
    # glibc reads its malloc settings once, at exec: they must be in the process's initial
    # environment (/proc/self/environ), not set later by os.environ.
    cluster = tune_adapter.connect(None, 1)
    try:
        assert cluster.started_here and cluster.cpus == 1

        @ray.remote(num_cpus=1)
        def initial_environment() -> list[str]:
            with open("/proc/self/environ") as f:
                return f.read().split("\0")

        env = ray.get(initial_environment.remote())
    finally:
        tune_adapter.disconnect(cluster)
    assert not ray.is_initialized()
    for key, value in tune_adapter.TRIAL_ENV.items():
        assert f"{key}={value}" in env
    assert "MALLOC_MMAP_THRESHOLD_" in tune_adapter.TRIAL_ENV


FINITE = {"alpha": CategoricalDistribution([1.0, 10.0]), "a": CategoricalDistribution([5.0, 30.0])}


def _finish(search: SettingSearch, number: int, config: dict, epochs: int = 4) -> None:
    value = config["alpha"] / 100 + config["a"] / 1000  # each config its own score
    for epoch in range(1, epochs + 1):
        search.report(number, epoch, value)
    search.tell(number, {"epoch": float(epochs), "val_acc": value, "diverged": 0.0})


def _states(search: SettingSearch) -> list[str]:
    return [t.state.name for t in search.study.trials]


def test_optuna_on_a_finite_space_never_trains_a_config_twice(tmp_path):
    # A sampler that always proposes the same config: every draw after the first is a repeat,
    # so each trial needs the redraws and then the untried fallback.
    stuck = optuna.samplers.PartialFixedSampler(
        {"alpha": 10.0, "a": 30.0}, optuna.samplers.RandomSampler(seed=0)
    )
    search = SettingSearch(tmp_path, 4, 4, seed=0, space=FINITE, sampler=stuck)
    running = search.next()
    seen = [running]
    for _ in range(3):  # one trial always running, as with two at a time
        chosen = search.next()
        assert chosen[1] not in [c for _, c in seen]  # neither a finished nor the running one
        _finish(search, *seen[-1])
        seen.append(chosen)
    _finish(search, *seen[-1])
    assert search.next() is None and search.asked() == 4  # the whole space, in 4 trials
    # Repeated draws were told their twin's outcome: a finished twin's value, or pruned while the
    # twin still ran; none is a value Optuna was not shown by a real trial.
    trials = search.study.trials
    real = {t.number: t for t in trials if TWIN_ATTR not in t.user_attrs}
    assert len(real) == 4 and len(trials) > 4  # repeats were drawn, and told
    for t in trials:
        if TWIN_ATTR in t.user_attrs:
            twin = real[t.user_attrs[TWIN_ATTR]]
            assert t.params == twin.params
            assert t.state.name in ("COMPLETE", "PRUNED")
            assert t.state.name == "PRUNED" or t.value == twin.value


def test_paper_configs_come_first_and_each_end_is_told_as_it_happened(tmp_path):
    space = {"alpha": FloatDistribution(0.1, 10, log=True)}
    search = SettingSearch(tmp_path, 3, 4, seed=0, space=space, first=[{"alpha": 1.0}])
    (n0, first), (n1, _), (n2, _) = search.next(), search.next(), search.next()
    assert first == {"alpha": 1.0} and search.next() is None
    search.tell(n0, {"epoch": 4.0, "val_acc": 0.6, "diverged": 0.0})  # its full budget
    search.report(n1, 1, 0.3)
    search.tell(n1, {"epoch": 1.0, "val_acc": 0.3, "diverged": 0.0})  # ASHA stopped it
    search.tell(n2, {"epoch": 2.0, "val_acc": float("nan"), "diverged": 1.0})
    assert _states(search) == ["COMPLETE", "PRUNED", "FAIL"]
    assert search.study.trials[1].intermediate_values == {1: 0.3}
    assert search.unfinished() == 0


def test_a_reopened_study_hands_out_its_unfinished_trials_first_and_replaces_none(tmp_path):
    # As after a killed driver: 3 of 5 asked, one told; the file ends in a half-written line and
    # the study's lock file is left behind.
    space = {"alpha": FloatDistribution(0.1, 10, log=True)}
    search = SettingSearch(tmp_path, 5, 4, seed=0, space=space)
    asked = [search.next() for _ in range(3)]
    _finish(search, asked[0][0], {"alpha": asked[0][1]["alpha"], "a": 0.0})
    search.study.ask(space)  # asked, then the kill came before it was handed out to Tune
    with open(tmp_path / STUDY_FILE, "a") as study:
        study.write('{"op_code": 4, "worker_')
    (tmp_path / f"{STUDY_FILE}.lock").symlink_to(tmp_path / STUDY_FILE)

    again = SettingSearch(tmp_path, 5, 4, seed=0, space=space)
    assert again.unfinished() == 2 and again.asked() == 3
    assert [again.next(), again.next()] == asked[1:]  # the same names and configs, first
    new = [again.next(), again.next()]
    assert again.next() is None  # 5 in all: nothing sampled in place of the unfinished two
    assert {n for n, _ in new} == {4, 5} and all(c not in [a for _, a in asked] for _, c in new)
    for number, config in [*asked[1:], *new]:
        _finish(again, number, {"alpha": config["alpha"], "a": 0.0})
    assert _states(again) == ["COMPLETE"] * 3 + ["FAIL"] + ["COMPLETE"] * 2  # never trained
    assert again.next() is None and again.next() is None  # each handed out once


def test_a_trial_handed_out_again_reports_its_later_epochs_to_its_study(tmp_path):
    # The killed driver left a trial after epoch 1; under the reopened study it goes on from its
    # checkpoint. Its later epochs join its first in the study (a resume's rule is rebuilt from
    # them; Optuna ranks a pruned trial by its last), and none is reported twice.
    space = {"alpha": FloatDistribution(0.1, 10, log=True)}
    search = SettingSearch(tmp_path, 2, 4, seed=0, space=space)
    number, config = search.next()
    search.report(number, 1, 0.3)

    again = SettingSearch(tmp_path, 2, 4, seed=0, space=space)
    assert again.next() == (number, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of a step reported twice
        for epoch, value in [(1, 0.3), (2, 0.5), (3, 0.6)]:
            again.report(number, epoch, value)
    again.tell(number, {"epoch": 3.0, "val_acc": 0.6, "diverged": 0.0})
    trial = again.study.trials[number]
    assert trial.state.name == "PRUNED" and trial.intermediate_values == {1: 0.3, 2: 0.5, 3: 0.6}


def test_configs_chosen_up_front_run_in_order_across_reopenings(tmp_path):
    configs = [{"alpha": float(k)} for k in range(4)]
    search = SettingSearch(tmp_path, 4, 2, seed=0, listed=configs)
    first = [search.next(), search.next()]
    assert first == [(0, configs[0]), (1, configs[1])]
    _finish(search, 0, {"alpha": 0.0, "a": 0.0}, epochs=2)
    again = SettingSearch(tmp_path, 4, 2, seed=0, listed=configs)
    assert [again.next() for _ in range(4)] == [
        (1, configs[1]),
        (2, configs[2]),
        (3, configs[3]),
        None,
    ]
    assert trial_name(3) == "t00003"


def test_the_one_private_ray_name_the_adapter_uses_still_exists():
    # `tune_adapter._keep_loopback` keeps a 127.0.0.1 address as given through this private
    # switch (Ray has no public one): an upgrade that renames it must fail here, not hang.
    from ray._private import ray_constants

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)


def test_only_the_tune_modules_import_ray():
    # Ray's API moves quickly: one adapter (tune_adapter and its tune_* modules) absorbs it.
    package = Path(tune_adapter.__file__).parent
    importers = set()
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(module.stem)
    assert importers == {"tune_adapter", "tune_search", "tune_callbacks", "tune_packs"}


@pytest.mark.parametrize("rf", [2, 3, 6])
def test_successive_halving_decides_as_optunas_pruner(rf):
    # Optuna's own SuccessiveHalvingPruner is the reference: trials report in an interleaved
    # order (as concurrent trials do), some past several rungs at once (as a resumed trial does),
    # and every decision must match.
    rng = random.Random(rf)
    study = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=rf),
    )
    rule = SuccessiveHalving(1, float(rf))
    running = {}
    decisions = []
    for n in range(40):
        running[n] = [study.ask(), 0, rng.random()]
        while len(running) > 3 or (n == 39 and running):
            number = rng.choice(list(running))
            trial, epoch, skill = running[number]
            epoch += 1 if rng.random() < 0.8 else 3  # now and then a jump over a rung
            value = math.nan if rng.random() < 0.02 else skill + 0.01 * epoch
            trial.report(value, epoch)
            pruned = trial.should_prune()
            assert rule.goes_on(str(number), epoch, value) is not pruned, (number, epoch)
            decisions.append(pruned)
            if pruned or epoch >= 40:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                del running[number]
            else:
                running[number][1] = epoch
    assert 0 < sum(decisions) < len(decisions)  # both decisions were taken


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_search_under_successive_halving_stops_trials_as_optuna_would(
    executor, local_ray, tmp_path
):
    # One trial at a time with scripted metrics (tests/scripted.py): the same values through
    # Optuna's pruner must stop the same trials at the same epochs, under either executor.
    ray.cloudpickle.register_pickle_by_value(scripted)
    spec = parse_spec(
        {
            "name": "sh",
            "dataset": "digits",
            "loss": "jal_ce",
            "noise": {"symmetric": [0.4]},
            "space": {"alpha": {"loguniform": [0.1, 10.0]}, "lr": {"loguniform": [0.002, 0.1]}},
            "budget": {"trials": 12, "epochs": 9},
            "scheduler": {"type": "successive_halving", "grace_period": 1, "reduction_factor": 3},
            "max_concurrent_trials": 1,
        },
        where="spec",
    )
    plans = plan(spec)
    counts = {p.name: trials_per_setting(spec, p.space) for p in plans}
    if executor == "ray":
        tune_adapter.run_search(spec, plans, str(tmp_path), counts, train=scripted.scripted_trial)
    else:
        local_search.run_search(
            spec, plans, str(tmp_path), counts, slots=1, train=scripted.scripted_trial
        )
    trials = read_trials(tmp_path, plans[0].name, {})
    reference = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    )
    for t in trials:  # in the order they ran
        trial = reference.ask()
        for row in t.history:
            trial.report(row["val_acc"], int(row["epoch"]))
            if trial.should_prune():
                break
        assert int(row["epoch"]) == len(t.history), t.trial_id
        reference.tell(trial, state=optuna.trial.TrialState.PRUNED)
    stopped = [len(t.history) for t in trials if len(t.history) < 9]
    assert stopped and set(stopped) <= {1, 3}  # at the rungs, epochs 1 and 3 (9 is the budget)
