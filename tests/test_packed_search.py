"""Packed searches on a real local Ray: TPE + ASHA with `pack: 3`, every trial trained in a slot
of a shared pack worker. Everywhere else (searcher, scheduler, journals, results, MLflow) each
trial is a trial of its own, with what `run_trial` would have given it: its own labels, lr
schedule and epochs exactly, its metrics as far as rounding lets them agree (`jal_search.packed`'s
docstring; a few steps to rounding, and members joining and leaving, in tests/test_packed.py)."""

from collections import Counter

import optuna
import pytest
import ray
import scripted
import yaml

from jal_search import results, search
from jal_search.experiment import read_manifest, read_trials
from jal_search.spec import parse_spec, plan, trials_per_setting
from jal_search.studies import STUDY_FILE
from jal_search.train import run_trial
from jal_search.tune_adapter import run_search

EPOCHS = 4
SPEC = {
    "name": "packed",
    "dataset": "digits",
    "loss": "jal_ce",
    "noise": {"symmetric": [0.4]},
    "space": {"alpha": {"loguniform": [0.1, 10.0]}, "lr": {"loguniform": [0.002, 0.1]}},
    "budget": {"trials": 10, "epochs": EPOCHS},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "searcher": {"type": "optuna", "seed": 3},
    "resources": {"cpus_per_trial": 1},
    "pack": 3,
}
SETTING = "symmetric-0.4"

# A member in a pack worker and a lone run in this process round differently; over a few noisy
# epochs they share only the distribution of their results: tests/rounding.py's bands.
ACC_BAND = 0.05
LOSS_BAND = 1e-3


@pytest.fixture(scope="module")
def packed(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    (folder / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return search.run(str(folder / "spec.yaml"), storage_path=str(folder / "runs"))


def test_every_trial_of_a_packed_tpe_asha_search_is_its_own(packed):
    (setting,) = read_manifest(packed)["settings"]
    assert setting["status"] == "done" and setting["failures"] == {}
    trials = read_trials(packed, SETTING, {})
    assert len(trials) == 10
    for t in trials:
        assert [r["epoch"] for r in t.history] == list(range(1, len(t.history) + 1))
        assert t.resolved["lr"] == t.config["lr"]  # its own sampled config trained
        # The test set at the epochs a trial may end on: ASHA's rungs (1, 2) and the last.
        tested = [r["epoch"] for r in t.history if "test_acc" in r]
        assert tested == [e for e in (1.0, 2.0, 4.0) if e <= len(t.history)]
    ends = Counter(t.status(EPOCHS, True) for t in trials)
    assert ends["completed"] >= 1 and ends["stopped"] >= 1  # ASHA stopped some, not all
    # Trained in packs: the rows of one pack epoch share its process and its epoch time.
    epochs = Counter((r["pid"], r["epoch_seconds"]) for t in trials for r in t.history)
    assert max(epochs.values()) >= 2
    assert len({r["pid"] for t in trials for r in t.history}) <= 2  # two workers, one per CPU


def test_the_study_records_each_packed_trial_as_the_journals_do(packed):
    study = optuna.load_study(
        study_name="jal",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(packed / SETTING / STUDY_FILE))
        ),
    )
    told = {f"t{t.number:05d}": t for t in study.trials}
    for trial in read_trials(packed, SETTING, {}):
        state = told[trial.trial_id].state
        expected = {
            "completed": optuna.trial.TrialState.COMPLETE,
            "stopped": optuna.trial.TrialState.PRUNED,
        }[trial.status(EPOCHS, True)]
        assert state == expected, trial.trial_id
        assert told[trial.trial_id].intermediate_values == {
            int(r["epoch"]): r["val_acc"] for r in trial.history
        }


def test_a_member_trains_as_its_config_would_alone(packed):
    trials = read_trials(packed, SETTING, {})
    member = max(trials, key=lambda t: (len(t.history), t.history[-1]["val_acc"]))
    (p,) = plan(parse_spec(SPEC, where="spec"))
    alone = run_trial(p.trial(member.config))
    assert len(member.history) == len(alone.history) == EPOCHS
    for a, m in zip(alone.history, member.history, strict=True):
        # Exactly: what does not depend on rounding (its own noisy labels, epochs, lr schedule).
        assert m["label_hash"] == alone.data.label_hash
        for key in ("epoch", "lr", "noise_realised", "diverged"):
            assert m[key] == a[key], (a["epoch"], key)
        assert m["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_BAND), a["epoch"]
        for key in ("noisy_fit", "memorized", "val_acc", "test_acc"):
            if key in a:  # test_acc: at the rungs and the last epoch only
                assert m[key] == pytest.approx(a[key], abs=ACC_BAND), (a["epoch"], key)


def test_results_and_mlflow_see_packed_trials_as_trials(packed):
    from mlflow import MlflowClient

    from jal_search.tracking import default_tracking_uri

    trials = read_trials(packed, SETTING, {})
    ex = results.with_trials(packed)
    assert results.trials_table(ex).num_rows == len(trials)
    best = results.best(ex, scope="last")[SETTING]
    finished = [t for t in trials if t.status(EPOCHS, True) == "completed"]
    assert best.params == max(finished, key=lambda t: t.history[-1]["val_acc"]).config
    client = MlflowClient(default_tracking_uri(packed))
    (experiment,) = client.search_experiments(filter_string="name = 'packed'")
    children = client.search_runs([experiment.experiment_id], "tags.`jal.role` = 'trial'")
    by_trial = {r.data.tags["jal.trial"]: r for r in children}
    assert sorted(by_trial) == sorted(f"{SETTING}/{t.trial_id}" for t in trials)
    for t in trials:
        run = by_trial[f"{SETTING}/{t.trial_id}"]
        assert run.data.tags["jal.status"] == t.status(EPOCHS, True)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
            r["val_acc"] for r in t.history
        ]


def test_packed_and_unpacked_searches_decide_alike_given_the_same_metrics(local_ray, tmp_path):
    # Scripted metrics (tests/scripted.py): the searcher and the scheduler see the same results
    # whether a trial runs alone or in a pack worker's slot, so they must suggest the same configs
    # and stop the same trials. One trial at a time, so that Tune's events come in one order.
    ray.cloudpickle.register_pickle_by_value(scripted)
    outcomes = []
    for pack in (1, 2):
        spec = parse_spec({**SPEC, "pack": pack, "max_concurrent_trials": 1}, where="spec")
        plans = plan(spec)
        counts = {p.name: trials_per_setting(spec, p.space) for p in plans}
        folder = tmp_path / f"pack{pack}"
        run_search(
            spec,
            plans,
            str(folder),
            counts,
            train=scripted.scripted_trial,
            pack_trainer=scripted.ScriptedPack,
        )
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(folder / SETTING / STUDY_FILE))
        )
        study = optuna.load_study(study_name="jal", storage=storage)
        trials = read_trials(folder, SETTING, {})
        outcomes.append(
            (
                [(t.params, t.state, t.intermediate_values) for t in study.trials],
                {t.trial_id: len(t.history) for t in trials},
            )
        )
    (alone, alone_epochs), (packed, packed_epochs) = outcomes
    assert len(alone) == 10 and packed == alone
    assert packed_epochs == alone_epochs
    assert 0 < sum(alone_epochs.values()) < 10 * EPOCHS  # ASHA stopped some


def test_a_trial_that_fails_in_a_pack_worker_fails_alone(local_ray, tmp_path):
    ray.cloudpickle.register_pickle_by_value(scripted)
    spec = parse_spec({**SPEC, "scheduler": {"type": "none"}, "max_failures": 1}, where="spec")
    plans = plan(spec)
    counts = {p.name: trials_per_setting(spec, p.space) for p in plans}
    failures = run_search(spec, plans, str(tmp_path), counts, pack_trainer=scripted.FailingPack)[
        SETTING
    ]
    trials = {t.trial_id: t for t in read_trials(tmp_path, SETTING, {})}
    failing = {n for n, t in trials.items() if t.config["alpha"] > 3}
    assert failing and len(failing) < len(trials)
    # Its own error, raised in the worker, is the reason given; the worker's other trials ran on.
    assert {f["trial_id"] for f in failures} == failing
    assert all(f["error"].startswith("ValueError: scripted failure of alpha") for f in failures)
    for name, t in trials.items():
        assert len(t.history) == (0 if name in failing else EPOCHS), name
