"""Paused halving (`studies.PausedHalving`, `scheduler.type: paused_halving`): the best of each
whole rung go on, whatever the order trials reach it in; what a paused trial is to its study and
to a search reopened after the driver died; and a real search under either executor."""

import math
import random
from pathlib import Path

import pytest
import ray
import scripted
import yaml
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution

from jal_search import local_search, search, tune_adapter
from jal_search.experiment import read_trials
from jal_search.spec import parse_spec, plan, trials_per_setting
from jal_search.studies import PausedHalving, SettingSearch
from jal_search.tracking import default_tracking_uri


def drive(rule: PausedHalving, skills: dict[int, float], order: list[int], slots: int):
    """Trials of `skills` (score at epoch e: skill + e/100) run `slots` at a time, started in
    `order`, a paused trial let go on before a new one; returns each trial's epochs and the most
    trials paused at once."""
    epochs = {n: 0 for n in skills}
    waiting, ready, running = list(order), [], []
    most_paused = 0
    while waiting or ready or running:
        while len(running) < slots and (ready or waiting):
            running.append(ready.pop(0) if ready else waiting.pop(0))
        n = running.pop(0)  # the trial whose epoch ends next
        epochs[n] += 1
        verdict = rule.judge(n, epochs[n], skills[n] + epochs[n] / 100)
        if verdict == "go" and epochs[n] < rule.max_epochs:
            running.append(n)
        elif verdict == "go":
            rule.ended(n)
        ready += [m for m, go in rule.decided().items() if go]
        most_paused = max(most_paused, len(rule.paused()))
    assert not rule.paused()  # every paused trial was decided
    return epochs, most_paused


@pytest.mark.parametrize(("count", "rf", "max_epochs"), [(12, 6, 8), (11, 3, 9), (27, 3, 27)])
def test_the_best_of_each_whole_rung_go_on_whatever_order_trials_reach_it_in(count, rf, max_epochs):
    rule = PausedHalving(1, rf, count, max_epochs)
    skills = {n: random.Random(count).random() + n / 1e6 for n in range(count)}
    skills = {n: random.Random(n * count).random() for n in range(count)}
    ranked = sorted(skills, key=skills.get, reverse=True)
    expected = {n: rule.rungs[0] for n in skills}  # what synchronous successive halving trains
    for k, quota in enumerate(rule.quota):
        for n in ranked[:quota]:
            expected[n] = rule.rungs[k + 1] if k + 1 < len(rule.rungs) else max_epochs
    assert sorted(expected.values()) != [max_epochs] * count  # the rule stops some
    for seed in range(5):
        order = list(skills)
        random.Random(seed).shuffle(order)
        for slots in (1, 2, 4):
            epochs, most_paused = drive(
                PausedHalving(1, rf, count, max_epochs), skills, order, slots
            )
            assert epochs == expected, (seed, slots)
            assert most_paused <= max(rule.quota)  # only trials still among the best wait


def test_ties_go_to_the_lower_trial_whatever_order_they_arrive_in():
    # On digits' 144 validation images ties are common, and a rule rebuilt after a restart
    # feeds trials in number order: a tie broken by arrival would decide otherwise.
    skills = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.1}
    for order in ([3, 2, 1, 0], [0, 1, 2, 3], [2, 0, 3, 1]):
        for slots in (1, 2):
            epochs, _ = drive(PausedHalving(1, 2, 4, 2), skills, order, slots)
            assert epochs == {0: 2, 1: 2, 2: 1, 3: 1}, (order, slots)  # the best 2 of 4 go on


def test_a_trial_stops_or_goes_on_at_once_when_later_arrivals_cannot_change_that():
    rule = PausedHalving(1, 2, 4, 4)  # rungs at epochs 1 and 2; the best 2 of 4 pass epoch 1
    assert rule.judge("a", 1, 0.5) == "pause"
    assert rule.judge("b", 1, 0.6) == "pause"
    assert rule.judge("c", 1, 0.4) == "stop"  # two have beaten it already
    assert rule.decided() == {"b": True}  # one more to come cannot push b out of the best 2
    assert rule.judge("d", 1, 0.7) == "go"  # the last to come, and the best
    assert rule.decided() == {"a": False}  # b and d beat it
    assert rule.judge("d", 2, 0.8) == "pause"  # rung 2: b may still beat it
    assert rule.judge("b", 2, 0.9) == "go" and rule.decided() == {"d": False}


def test_a_trial_that_ends_before_a_rung_is_counted_out_of_it():
    rule = PausedHalving(1, 2, 3, 4)  # the best of 3 passes epoch 1
    assert rule.judge("a", 1, 0.5) == "pause"
    rule.ended("b")  # failed before its first epoch
    assert rule.decided() == {}
    assert rule.judge("c", 1, math.nan) == "stop"  # diverged
    assert rule.decided() == {"a": True}


def setting(folder, count: int = 5) -> SettingSearch:
    """A setting of `count` trials, the paper's config {x: 0.5} among them."""
    return SettingSearch(
        folder,
        count,
        max_epochs=4,
        seed=0,
        space={"x": FloatDistribution(0.0, 1.0)},
        first=[{"x": 0.5}],
        halving=(1, 2.0),  # rungs at epochs 1 and 2; the best 2 of the 4 judged pass epoch 1
    )


def row(epoch: int, value: float) -> dict:
    return {"epoch": epoch, "val_acc": value, "diverged": 0.0}


def judge(search: SettingSearch, number: int, epoch: int, value: float) -> str:
    search.report(number, epoch, value)  # as both executors do, before the verdict
    return search.judge(number, epoch, value)


def test_a_paused_trial_waits_in_its_study_and_a_reopened_search_waits_for_it(tmp_path):
    first = setting(tmp_path)
    (a, _), (b, config_b) = first.next(), first.next()
    assert judge(first, a, 1, 0.3) == "pause" and first.paused_at(a, 1)
    first.tell(a, row(1, 0.3))  # its run ended paused: not told
    assert judge(first, b, 1, 0.4) == "pause"
    first.tell(b, row(1, 0.4))
    states = {t.number: t.state.name for t in first.study.trials}
    assert states[a] == states[b] == "RUNNING"
    # The driver dies. A reopened search finds both paused, hands neither out yet, and decides
    # them as the rest of the rung comes in.
    again = setting(tmp_path)
    assert again.waiting()
    c, _ = again.next()
    assert c not in (a, b)
    assert judge(again, c, 1, 0.9) == "go"  # the best so far, with one more trial to come
    d, _ = again.next()
    assert judge(again, d, 1, 0.1) == "stop"
    again.tell(d, row(1, 0.1))
    # The rung is in: a is out (told PRUNED now), b goes on from its checkpoint, under its number.
    assert again.next() == (b, config_b)
    assert [(n, last["epoch"]) for n, last in again.take_stopped()] == [(a, 1)]
    states = {t.number: t.state.name for t in again.study.trials}
    assert states[a] == "PRUNED" and states[d] == "PRUNED" and states[b] == "RUNNING"
    # The paper's config comes last, and the rule never stops it.
    paper, config = again.next()
    assert config == {"x": 0.5} and judge(again, paper, 1, 0.0) == "go"
    # b reaches the next rung, where c may yet beat it, and pauses; the driver dies again. b's
    # score there is in the study, so the next reopen parks it at that rung, not before it.
    assert judge(again, b, 2, 0.4) == "pause"
    again.tell(b, row(2, 0.4))
    third = setting(tmp_path)
    assert third.waiting() and third.next()[0] == c  # c goes on from its checkpoint
    assert judge(third, c, 2, 0.9) == "go"  # the rung's one place: b is out
    assert third.next() == (paper, {"x": 0.5})
    assert [(n, last["epoch"]) for n, last in third.take_stopped()] == [(b, 2)]
    assert third.next() is None and not third.waiting()


def test_a_reopened_search_judges_each_rung_as_the_live_one_did(tmp_path):
    # A trial that failed before the first rung let b past it, and b paused at the next; the
    # driver dies. Reopened, the rule counts the failed trial out of the first rung before it
    # judges b at the second, so b waits there, as it did, and is not run on past it.
    first = setting(tmp_path)
    (a, config_a), (b, config_b), (c, _), (d, config_d) = [first.next() for _ in range(4)]
    assert judge(first, a, 1, 0.3) == "pause"
    first.tell(a, row(1, 0.3))
    assert judge(first, b, 1, 0.4) == "pause"
    first.tell(b, row(1, 0.4))
    first.tell(c, None)  # failed in its first epoch
    assert first.next() == (b, config_b)  # second at worst of the 3 left: goes on
    assert judge(first, b, 2, 0.4) == "pause"  # a or d may yet pass it there
    first.tell(b, row(2, 0.4))

    again = setting(tmp_path)
    assert again.waiting() and again.next() == (d, config_d)
    assert judge(again, d, 1, 0.1) == "stop"
    again.tell(d, row(1, 0.1))
    assert again.next() == (a, config_a)  # the first rung is in: a is its second
    assert judge(again, a, 2, 0.5) == "go"  # and the best at the next one
    assert again.next()[1] == {"x": 0.5}  # the paper's config
    assert [(n, last["epoch"]) for n, last in again.take_stopped()] == [(b, 2)]
    assert again.next() is None and not again.waiting()


@pytest.mark.parametrize("executor", ["ray", "ray-pack", "local"])
def test_a_search_under_paused_halving_trains_the_best_of_every_rung(executor, local_ray, tmp_path):
    # Two trials at a time with scripted metrics (tests/scripted.py: a config's score rises by
    # the same step every epoch, so its rank is the same at every rung): the paper's config runs
    # its budget, and of the 11 others, the best 3 at epoch 1 reach epoch 3 and the best of them
    # epoch 9, whatever order they ran in. A paused trial goes on from its checkpoint.
    ray.cloudpickle.register_pickle_by_value(scripted)
    spec = parse_spec(
        {
            "name": "ph",
            "dataset": "digits",
            "loss": "jal_ce",
            "noise": {"symmetric": [0.4]},
            "space": {"alpha": {"loguniform": [0.1, 10.0]}, "lr": {"loguniform": [0.002, 0.1]}},
            "budget": {"trials": 12, "epochs": 9},
            "scheduler": {"type": "paused_halving", "grace_period": 1, "reduction_factor": 3},
            "max_concurrent_trials": 2,
            "executor": executor.split("-")[0],
            "pack": 2 if executor == "ray-pack" else 1,  # a paused member leaves its pack
        },
        where="spec",
    )
    plans = plan(spec)
    counts = {p.name: trials_per_setting(spec, p.space) for p in plans}
    if executor.startswith("ray"):
        tune_adapter.run_search(
            spec,
            plans,
            str(tmp_path),
            counts,
            train=scripted.scripted_trial,
            pack_trainer=scripted.ScriptedPack,
        )
    else:
        local_search.run_search(
            spec, plans, str(tmp_path), counts, slots=2, train=scripted.scripted_trial
        )
    trials = read_trials(tmp_path, plans[0].name, {})
    assert len(trials) == 12
    paper = [t for t in trials if t.config == plans[0].points_to_evaluate[0]]
    assert len(paper) == 1 and len(paper[0].history) == 9
    others = sorted(
        (t for t in trials if t is not paper[0]), key=lambda t: -t.history[0]["val_acc"]
    )
    assert [len(t.history) for t in others] == [9, 3, 3] + [1] * 8
    for t in trials:  # one journal each, epoch after epoch, across its pauses
        assert [r["epoch"] for r in t.history] == list(range(1, len(t.history) + 1))
    assert any(t.history[-1]["start"] > 1 for t in others[:3])  # one paused, then went on


def test_an_extended_setting_judges_its_new_trials_against_the_finished_ones(tmp_path):
    # `extend` reopens a finished setting with more trials: its finished trials count at the
    # rungs they reached (with the larger count, more go on), none is waited for, and the new
    # trials run to a decision.
    skill = lambda config: config["x"]  # noqa: E731 - a config's score, the same at every epoch

    def run(search: SettingSearch) -> dict[int, int]:
        epochs = {}
        while (chosen := search.next()) is not None:
            number, config = chosen
            epoch = epochs.get(number, 0)
            while True:
                epoch += 1
                search.report(number, epoch, skill(config))
                verdict = search.judge(number, epoch, skill(config))
                if verdict != "go" or epoch == 4:
                    break
            epochs[number] = epoch
            search.tell(number, row(epoch, skill(config)))
        assert not search.waiting()
        return epochs

    before = run(setting(tmp_path, count=5))
    assert sorted(before.values()) == [1, 1, 2, 4, 4]  # the paper's config; of 4: 2, then 1
    after = run(setting(tmp_path, count=9))
    assert set(after) == set(range(5, 9))  # only the new trials ran
    states = [t.state.name for t in setting(tmp_path, count=9).study.trials]
    assert "RUNNING" not in states and states.count("COMPLETE") >= 2


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_paused_trial_keeps_one_mlflow_run_across_its_pauses(executor, local_ray, tmp_path):
    # The whole driver (search.run) with its tracker: a trial's Tune trials (or runs in a thread)
    # end at each pause, its MLflow run does not: one run per trial, ended once, with every epoch
    # its journal holds.
    spec = {
        "name": "tracked", "dataset": "digits", "loss": "jal_ce", "executor": executor,
        "noise": {"symmetric": [0.4]},
        "space": {"alpha": {"loguniform": [0.3, 100]}, "beta": {"loguniform": [0.03, 10]}},
        "budget": {"trials": 12, "epochs": 6},
        "scheduler": {"type": "paused_halving", "grace_period": 1, "reduction_factor": 3},
        "max_concurrent_trials": 2,
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    path = Path(search.run(str(tmp_path / "spec.yaml"), storage_path=str(tmp_path)))
    trials = {t.trial_id: t for t in read_trials(path, "symmetric-0.4", {})}
    assert sorted(len(t.history) for t in trials.values()) == [1] * 8 + [3, 3, 6, 6]
    client = MlflowClient(default_tracking_uri(path))
    (experiment,) = client.search_experiments(filter_string="name = 'tracked'")
    runs = client.search_runs([experiment.experiment_id], "tags.`jal.role` = 'trial'")
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == sorted(trials)
    for run in runs:
        trial = trials[run.data.tags["mlflow.runName"]]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == [int(row["epoch"]) for row in trial.history]
        assert run.info.status == "FINISHED"
        ended = "completed" if len(trial.history) == 6 else "stopped"
        assert run.data.tags["jal.status"] == ended


def test_a_trial_that_fails_while_others_wait_lets_the_rung_decide_them(tmp_path, capsys):
    # Three configs in grid order, one trial at a time: the best of 3 passes epoch 1. The first
    # waits there; the second fails for good (counted out of the rung); the third's arrival
    # decides both waiting and arriving — the search ends, none left waiting.
    def training(config, report=None, resume=None):
        if config.loss_params["alpha"] == 10.0:
            raise RuntimeError("boom")
        scripted.scripted_trial(config, report, resume)

    spec = parse_spec(
        {
            "name": "failing",
            "dataset": "digits",
            "loss": "jal_ce",
            "executor": "local",
            "noise": {"symmetric": [0.4]},
            "space": {"alpha": {"choice": [1.0, 10.0, 3.0]}},
            "budget": {"trials": 3, "epochs": 4},
            "searcher": {"type": "grid"},
            "scheduler": {"type": "paused_halving", "grace_period": 1, "reduction_factor": 2},
        },  # fmt: skip
        where="spec",
    )
    plans = plan(spec)
    counts = {p.name: trials_per_setting(spec, p.space) for p in plans}
    failed = local_search.run_search(spec, plans, str(tmp_path), counts, slots=1, train=training)
    assert [f["error"] for f in failed[plans[0].name]] == ["RuntimeError: boom"]
    by_alpha = {t.config["alpha"]: len(t.history) for t in read_trials(tmp_path, plans[0].name, {})}
    assert by_alpha == {1.0: 4, 10.0: 0, 3.0: 1}  # scripted: alpha 1 scores best
    out = capsys.readouterr().out
    assert "t00000: paused at epoch 1" in out and "t00000: completed at epoch 4" in out
