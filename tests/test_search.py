"""The search driver on a real local Ray: Optuna + ASHA per noise setting, resume after SIGKILL."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from jal_search import search
from jal_search.experiment import read_manifest, read_trials
from jal_search.journal import read_journal
from jal_search.spec import SPACES_DIR, load_spec
from jal_search.studies import STUDY_FILE


@pytest.fixture(scope="module")
def smoke(local_ray, tmp_path_factory):
    """The shipped smoke search, run once for the tests that read its results."""
    return search.run("smoke", storage_path=str(tmp_path_factory.mktemp("smoke")))


def test_smoke_search_end_to_end(smoke):
    path = smoke
    manifest = read_manifest(path)
    spec = load_spec("smoke")
    assert [s["name"] for s in manifest["settings"]] == ["symmetric-0.4", "asymmetric-0.2"]
    assert all(s["status"] == "done" for s in manifest["settings"])
    for setting in manifest["settings"]:
        trials = read_trials(path, setting["name"], setting["failures"])
        assert len(trials) == spec.budget.trials
        epochs = sorted(len(t.history) for t in trials)
        assert (
            epochs[-1] == spec.budget.epochs and epochs[0] < spec.budget.epochs
        )  # ASHA stopped some
        # The paper's shipped config ran, and no sampled `a` lies below AMSE's bound.
        assert any(t.config == {"alpha": 1.0, "beta": 1.0, "a": 30.0} for t in trials)
        assert all(t.config["a"] >= setting["a_min"] for t in trials)
        # Optuna saw ASHA's early stops as pruned trials, not as finished ones.
        storage = JournalStorage(JournalFileBackend(str(path / setting["name"] / STUDY_FILE)))
        states = [t.state.name for t in optuna.load_study(study_name="jal", storage=storage).trials]
        stopped = sum(1 for n in epochs if n < spec.budget.epochs)
        assert (
            states.count("PRUNED") == stopped and states.count("COMPLETE") == len(trials) - stopped
        )
    best = search.best_trials(path)
    assert [b.setting for b in best] == ["symmetric-0.4", "asymmetric-0.2"]
    assert search.summary_table(path).startswith("best config per noise setting")


def test_mlflow_shows_the_search_as_it_ran(smoke):
    """Before any other command: each parent holds its setting's report, stopped trials read as
    finished, and every child spans its trial's epochs with the clean-accuracy estimate."""
    import math

    from mlflow import MlflowClient

    from jal_search.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(smoke))
    (experiment,) = client.search_experiments(filter_string="name = 'smoke'")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    ids = [experiment.experiment_id]
    for parent in client.search_runs(ids, "tags.`jal.role` = 'setting'"):
        files = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
        assert {"results/summary.md", "results/trials.parquet", "results/plots"} <= files
        assert math.isfinite(parent.data.metrics["best_val_acc_clean_est"])
    children = client.search_runs(ids, "tags.`jal.role` = 'trial'")
    assert len(children) == 12 and sum(r.data.tags.get("jal.best") == "true" for r in children) == 2
    statuses = {r.data.tags["jal.status"] for r in children}
    assert "stopped" in statuses and "KILLED" not in {r.info.status for r in children}
    for run in children:
        tags = run.data.tags
        failed = tags["jal.status"] in ("failed", "diverged")
        assert run.info.status == ("FAILED" if failed else "FINISHED")
        if tags["jal.status"] == "stopped":
            assert re.match(
                r"Stopped by ASHA at epoch \d \(rung \d of 2\)", tags["mlflow.note.content"]
            )
        seconds = client.get_metric_history(run.info.run_id, "epoch_seconds")
        stamps = [m.timestamp for m in seconds]
        assert run.info.start_time < min(stamps) and run.info.end_time == max(stamps)
        # the run lasts its epochs at least (it starts when the trial started, before epoch 1)
        assert run.info.end_time - run.info.start_time >= 1000 * sum(m.value for m in seconds)
        estimates = client.get_metric_history(run.info.run_id, "val_acc_clean_est")
        assert sorted(m.step for m in estimates) == sorted(m.step for m in seconds)


def test_results_verbs_write_tables_plots_and_an_export(smoke, capsys):
    import pyarrow.parquet as pq

    from jal_search.cli import main

    assert main(["results", str(smoke)]) == 0
    trials = pq.read_table(smoke / "results" / "trials.parquet")
    epochs = pq.read_table(smoke / "results" / "epochs.parquet")
    assert trials.num_rows == 12  # 2 settings × 6 trials
    on_disk = sum(len(read_journal(p)[1]) for p in smoke.glob("*/t*"))
    assert epochs.num_rows == on_disk
    assert main(["export", str(smoke), "--out", str(smoke / "best.yaml")]) == 0
    assert yaml.safe_load((smoke / "best.yaml").read_text())["settings"].keys() == {
        "symmetric-0.4",
        "asymmetric-0.2",
    }
    assert main(["report", str(smoke)]) == 0
    assert len(list((smoke / "results" / "plots").glob("*.png"))) >= 4
    assert "logged results to MLflow" in capsys.readouterr().out
    # Every parent run in MLflow now carries the tables and plots.
    from mlflow import MlflowClient

    from jal_search.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(smoke))
    (experiment,) = client.search_experiments(filter_string="name = 'smoke'")
    parents = client.search_runs([experiment.experiment_id], "tags.`jal.role` = 'setting'")
    assert len(parents) == 2
    for run in parents:
        files = {a.path for a in client.list_artifacts(run.info.run_id, "search")}
        assert {"search/trials.parquet", "search/plots", "search/summary.md"} <= files


def test_evaluate_reruns_each_best_config_over_seeds_as_ray_tasks(smoke, capsys, monkeypatch):
    import pyarrow.parquet as pq

    from jal_search import tune_adapter

    def final() -> dict[tuple[str, int], dict]:
        rows = pq.read_table(smoke / "results" / "final.parquet").to_pylist()
        return {(r["setting"], r["seed"]): r for r in rows}

    tasks = []  # per evaluate: the packs of configs given to Ray, and what their tasks returned
    run_trainings = tune_adapter.run_trainings

    def spy(packs, *args):
        outcomes = run_trainings(packs, *args)
        tasks.append(list(zip(packs, outcomes, strict=True)))
        return outcomes

    monkeypatch.setattr(tune_adapter, "run_trainings", spy)

    def trained() -> dict[tuple[str, int], dict]:
        """The last evaluate's trainings by (setting, seed), each with its own seeds."""
        out = {}
        for configs, outcomes in tasks[-1]:
            for config, outcome in zip(configs, outcomes, strict=True):
                assert config.noise_seed == config.seed  # each seed draws its own noisy labels
                out[config.noise_name, config.seed] = outcome
        return out

    table = search.evaluate(str(smoke), seeds=2)  # 4 trainings, 2 CPUs: 2 packs of 2
    assert "4 trainings in 2 Ray tasks" in capsys.readouterr().out
    assert [len(configs) for configs, _ in tasks[-1]] == [2, 2]
    packed, packed_runs = final(), trained()
    keys = {(s, seed) for s in ("symmetric-0.4", "asymmetric-0.2") for seed in (123, 124)}
    assert set(packed) == set(packed_runs) == keys
    assert all(r["status"] == "completed" and 0 < r["test_acc"] <= 1 for r in packed.values())
    for key, row in packed.items():  # each row is its own training's outcome
        assert all(row[m] == packed_runs[key][m] for m in ("status", "test_acc", "val_acc")), key
    assert "±" in table and "(n=2)" in table
    # Packing changes where a training runs, not what it is: one task per training runs the same
    # configs to the same epoch and lr; the metrics, after 4 noisy epochs in another layout, agree
    # only in distribution (jal_search.packed). Band: 1-ulp nudges of every weight after every
    # step moved test_acc by up to 0.064 (23 of 360 images) over 400 configs of the smoke space
    # at its 4 epochs, ≤ 0.022 for the ~80% that reach 0.9 (mean 0.002); an Intel Xeon saw 0.014
    # between the layouts. A training that learnt little or nothing lands outside: the best
    # configs' test_acc is 0.95 to 0.97 here.
    search.evaluate(str(smoke), seeds=2, pack=1)
    assert "4 trainings in 4 Ray tasks" in capsys.readouterr().out
    assert [len(configs) for configs, _ in tasks[-1]] == [1, 1, 1, 1]
    alone_runs, alone_rows = trained(), final()
    assert set(alone_runs) == set(packed_runs)
    for key, alone in alone_runs.items():
        run = packed_runs[key]
        for metric in ("status", "epoch", "lr", "noise_realised", "diverged"):
            assert alone[metric] == run[metric], (key, metric)
        assert alone["epoch"] == 4
        for metric in ("test_acc", "val_acc"):
            assert alone[metric] == pytest.approx(run[metric], abs=0.1), (key, metric)
        assert alone_rows[key]["test_acc"] == alone["test_acc"]


def test_a_second_run_of_the_same_experiment_is_refused(local_ray, tmp_path, capsys):
    from jal_search.cli import main

    spec = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())
    spec.update(
        noise={"symmetric": [0.4]}, budget={"trials": 1, "epochs": 1}, scheduler={"type": "none"}
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "s.yaml"), "--storage-path", str(tmp_path / "r")]) == 0
    assert main(["run", str(tmp_path / "s.yaml"), "--storage-path", str(tmp_path / "r")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_optuna_on_a_finite_space_runs_each_config_once(local_ray, tmp_path):
    # 4 configs and a budget of 6: TPE would re-propose good configs; each runs once, then stop.
    spec = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())
    spec.update(
        noise={"symmetric": [0.4]},
        space={"alpha": {"choice": [1.0, 10.0]}, "beta": {"choice": [0.1, 1.0]}, "a": 30.0},
        budget={"trials": 6, "epochs": 2},
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    path = search.run(str(tmp_path / "s.yaml"), storage_path=str(tmp_path / "r"))
    (setting,) = read_manifest(path)["settings"]
    assert setting["status"] == "done"
    trials = read_trials(path, setting["name"], setting["failures"])
    configs = sorted((t.config["alpha"], t.config["beta"]) for t in trials)
    assert configs == [(1.0, 0.1), (1.0, 1.0), (10.0, 0.1), (10.0, 1.0)]


def test_extend_runs_more_trials_with_each_setting_searcher_warm(local_ray, tmp_path, capsys):
    from jal_search.cli import main

    spec = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())
    spec.update(budget={"trials": 2, "epochs": 2}, scheduler={"type": "none"})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    path = search.run(str(tmp_path / "s.yaml"), storage_path=str(tmp_path / "r"))
    before = {p: p.read_text() for p in path.glob("*/t*/journal.jsonl")}
    assert len(before) == 4  # 2 settings × 2 trials

    assert main(["extend", str(path), "--trials", "3", "--setting", "asymmetric-0.2"]) == 0
    settings = {s["name"]: s for s in read_manifest(path)["settings"]}
    assert {n: (s["trials"], s["status"]) for n, s in settings.items()} == {
        "symmetric-0.4": (2, "done"),
        "asymmetric-0.2": (5, "done"),
    }
    assert {n: len(read_trials(path, n, {})) for n in settings} == {
        "symmetric-0.4": 2,
        "asymmetric-0.2": 5,
    }
    assert all(p.read_text() == text for p, text in before.items())  # earlier trials untouched
    storage = JournalStorage(JournalFileBackend(str(path / "asymmetric-0.2" / STUDY_FILE)))
    study = optuna.load_study(study_name="jal", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5  # one study, carried on
    configs = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(configs)) == 5  # no config drawn again after the reopening

    for argv, message in (
        (["--trials", "0"], "--trials: must be at least 1"),
        (["--trials", "1", "--setting", "clean"], "'clean' is not a setting"),
    ):
        assert main(["extend", str(path), *argv]) == 2
        assert message in capsys.readouterr().err


def test_resuming_an_experiment_of_the_older_layout_is_refused(tmp_path):
    # Older versions ran one Tune experiment per noise setting, in the setting's folder.
    from fabricate import fabricate

    path = fabricate(tmp_path, {})
    (path / "symmetric-0.4").mkdir()
    (path / "symmetric-0.4" / "tuner.pkl").write_bytes(b"")
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    out = subprocess.run([sys.executable, "-m", "jal_search.cli", "resume", str(path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "older jal-search" in err[0] and "--name" in err[0], out.stderr
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before  # nothing written


def finished(path: Path, epochs: int) -> dict[str, list[dict]]:
    """Trials whose journal reached the last epoch, with their rows."""
    done = {}
    for folder in path.glob("*/t*"):
        _, rows = read_journal(folder)
        if rows and rows[-1]["epoch"] == epochs:
            done[folder.name] = rows
    return done


def session_processes(session: int) -> set[int]:
    """Live processes of a session (/proc/<pid>/stat: state, ppid, pgrp, session after ')')."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


KILL_EPOCHS = 10  # ~1 s per trial: most of the 12 are still to run when the kill comes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("executor", "stop"),
    [("ray", signal.SIGKILL), ("local", signal.SIGKILL), ("local", signal.SIGINT)],
    ids=["ray-killed", "local-killed", "local-interrupted"],
)
def test_resume_after_the_driver_is_killed(executor, stop, tmp_path):
    # The fault: the driver (and its private Ray) is SIGKILLed mid-search, possibly mid-write, or
    # interrupted (Ctrl-C). The promise: `resume` completes the budget, trials finished before
    # the stop are kept, not rerun, and no trial is sampled in place of one already asked.
    spec = {
        "name": "killed", "dataset": "digits", "loss": "jal_ce", "noise": {"symmetric": [0.4]},
        "space": {"alpha": {"loguniform": [0.3, 100]}, "beta": {"loguniform": [0.03, 10]}},
        "budget": {"trials": 12, "epochs": KILL_EPOCHS}, "scheduler": {"type": "none"},
        "max_concurrent_trials": 2, "storage_path": str(tmp_path / "runs"), "executor": executor,
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "jal_search.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([*cli, "run", str(tmp_path / "spec.yaml"), "--num-cpus", "2"],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    experiment = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 240
    while len(finished(experiment, KILL_EPOCHS)) < 2:
        assert driver.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)
    settled = {
        trial_id: [(row["epoch"], row["epoch_seconds"], row["val_acc"]) for row in rows]
        for trial_id, rows in finished(experiment, KILL_EPOCHS).items()
    }
    time.sleep(1.0)
    os.killpg(driver.pid, stop)
    # Interrupted, the driver stops every trial at its next epoch and says so (exit 130).
    assert driver.wait(timeout=120) == (130 if stop == signal.SIGINT else -signal.SIGKILL)
    # Ray workers outside the killed process group die once they notice their raylet is gone;
    # until then one may still finish an epoch (a restart of its trial waits for it to exit).
    deadline = time.monotonic() + 60
    while session_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(finished(experiment, KILL_EPOCHS)) < 12, "the search ended before it was killed"
    asked = {p.name for p in experiment.glob("symmetric-0.4/t*")}
    # What a kill mid-append leaves: a half-written last line in the study and in a journal.
    with open(experiment / "symmetric-0.4" / "optuna.journal", "a") as study:
        study.write('{"op_code": 4, "worker_id": "x", "trial_')
    unfinished = sorted(asked - set(finished(experiment, KILL_EPOCHS))) or sorted(asked)[-1:]
    with open(experiment / "symmetric-0.4" / unfinished[0] / "journal.jsonl", "a") as journal:
        journal.write('{"epoch": 9, "val')

    out = subprocess.run([*cli, "resume", str(experiment), "--num-cpus", "2"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    after = {t.trial_id: t for t in read_trials(experiment, "symmetric-0.4", {})}
    assert len(after) == 12  # the whole budget, no more
    assert asked <= set(after)  # every trial asked before the kill ran on: none replaced
    for trial in after.values():
        assert [row["training_iteration"] for row in trial.history] == list(
            range(1, KILL_EPOCHS + 1)
        )
        assert set(trial.config) == {"alpha", "beta"}
    for trial_id, epochs in settled.items():  # kept, not rerun
        kept = after[trial_id].history
        assert [(row["epoch"], row["epoch_seconds"], row["val_acc"]) for row in kept] == epochs
    assert read_manifest(experiment)["settings"][0]["status"] == "done"
    assert "best config per noise setting" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_search_killed_while_trials_are_paused_resumes_them_from_their_rung(executor, tmp_path):
    # Paused halving: the first trials to reach epoch 1 wait there, paused, until the whole rung
    # is in. The driver is killed while they wait. The promise: `resume` finds them paused in
    # their study, decides them as the rest of the rung comes in, and goes on from their
    # checkpoints; nothing trained before the kill is lost or trained again, and the rule's
    # quotas hold across the kill (rf 3, 11 trials judged: 3 pass epoch 1, 1 passes epoch 3).
    spec = {
        "name": "paused", "dataset": "digits", "loss": "jal_ce", "noise": {"symmetric": [0.4]},
        "space": {"alpha": {"loguniform": [0.3, 100]}, "beta": {"loguniform": [0.03, 10]}},
        "budget": {"trials": 12, "epochs": KILL_EPOCHS},
        "scheduler": {"type": "paused_halving", "grace_period": 1, "reduction_factor": 3},
        "max_concurrent_trials": 2, "storage_path": str(tmp_path / "runs"), "executor": executor,
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "jal_search.cli"]
    driver = subprocess.Popen([*cli, "run", str(tmp_path / "spec.yaml"), "--num-cpus", "2"],
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    setting = tmp_path / "runs" / "paused" / "symmetric-0.4"
    deadline = time.monotonic() + 240
    while len([f for f in setting.glob("t*") if read_journal(f)[1]]) < 5:
        assert driver.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline, "too few trials reached epoch 1 in time"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    deadline = time.monotonic() + 60
    while session_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    before = {f.name: read_journal(f)[1] for f in setting.glob("t*")}
    assert sum(1 for rows in before.values() if len(rows) == 1) >= 3  # among them, the waiting

    out = subprocess.run([*cli, "resume", str(tmp_path / "runs" / "paused"), "--num-cpus", "2"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    after = {t.trial_id: t for t in read_trials(setting.parent, "symmetric-0.4", {})}
    assert len(after) == 12 and set(before) <= set(after)
    for trial_id, rows in before.items():  # kept, not trained again
        kept = [(r["epoch"], r["val_acc"]) for r in after[trial_id].history[: len(rows)]]
        assert kept == [(r["epoch"], r["val_acc"]) for r in rows], trial_id
    for trial in after.values():
        assert [r["epoch"] for r in trial.history] == list(range(1, len(trial.history) + 1))
    paper = {"alpha": 1.0, "beta": 1.0}  # the paper's config on this space: its whole budget
    assert [len(t.history) for t in after.values() if t.config == paper] == [KILL_EPOCHS]
    epochs = [len(t.history) for t in after.values() if t.config != paper]
    judged = [max(e for e in (1, 3, 9, KILL_EPOCHS) if e <= n) for n in epochs]  # last rung
    assert sorted(judged, reverse=True) == [KILL_EPOCHS, 3, 3] + [1] * 8
    # Under Ray a trial process outlives the killed driver by up to an epoch (see the test
    # above): a trial waiting at a rung then has one more epoch, kept, that no rule asked for.
    assert sum(n not in (1, 3, KILL_EPOCHS) for n in epochs) <= (2 if executor == "ray" else 0)
    study = optuna.load_study(
        study_name="jal", storage=JournalStorage(JournalFileBackend(str(setting / STUDY_FILE)))
    )
    assert "RUNNING" not in {t.state.name for t in study.trials}
