"""Fault 1: trials raise mid-training. Promise: each retries from its last checkpoint, up to
`max_failures`; one that keeps failing is marked failed with its reason (results table and
MLflow); the search completes. The same run proves that a secret set in the environment
(MLFLOW_TRACKING_PASSWORD) reaches no file, table, artifact or output.

The fault comes from tests/faults/inject/sitecustomize.py, which Python loads in the driver
and every Ray worker because it is on their PYTHONPATH: it makes the training loop's per-epoch
`report` hook raise `InjectedFault` before reporting a random epoch (≥ 2, so a checkpoint
exists). Nothing under test is replaced: Tune's retries, the checkpoint restore, the manifest,
the tables and MLflow run as shipped.
"""

import json
import secrets

import pyarrow.parquet as pq
import pytest
from faultkit import INJECT, environment, files_containing, jal, trial_rows, write_spec
from mlflow import MlflowClient

from jal_search import results
from jal_search.experiment import read_manifest

EPOCHS, MAX_FAILURES, ALWAYS = 4, 1, 1.0  # alpha=1.0 is the paper's point, evaluated first


@pytest.mark.slow
def test_failing_trials_retry_from_checkpoints_and_a_persistent_failure_is_recorded(
    tmp_path, ray_tmp
):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    plan = {"dir": str(attempts), "epochs": [2, EPOCHS], "always": {"alpha": ALWAYS}}
    password = secrets.token_hex(16)
    env = environment(
        ray_tmp,
        PYTHONPATH=str(INJECT),
        JAL_FAULT_PLAN=json.dumps(plan),
        MLFLOW_TRACKING_USERNAME="jal",
        MLFLOW_TRACKING_PASSWORD=password,
    )
    spec = write_spec(
        tmp_path, "flaky", budget={"trials": 3, "epochs": EPOCHS}, max_failures=MAX_FAILURES
    )
    run = jal("run", str(spec), "--num-cpus", "2", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    experiment = tmp_path / "runs" / "flaky"

    # Every trial was hit; each retry started from the checkpoint of the epoch before the fault.
    log = {p.name: p.read_text().splitlines() for p in attempts.iterdir()}
    assert len(log) == 3
    for lines in log.values():
        first = lines[0].split()
        assert first[0] == "start=0" and first[1].startswith("raised=")
        fault_epoch = int(first[1].removeprefix("raised="))
        assert all(line.startswith(f"start={fault_epoch - 1} ") for line in lines[1:])
    failed = [t for t, lines in log.items() if not lines[-1].endswith("raised=-")]
    assert len(failed) == 1  # only the alpha=1.0 trial fails on every attempt
    assert len(log[failed[0]]) == MAX_FAILURES + 1

    # The manifest, the tables and MLflow agree on who failed and why.
    setting = read_manifest(experiment)["settings"][0]
    assert setting["status"] == "done"
    assert list(setting["failures"]) == failed
    reason = setting["failures"][failed[0]]
    assert reason.startswith("InjectedFault: injected at epoch") and "\x1b" not in reason

    results.write_tables(experiment)
    trials = {
        r["trial_id"]: r for r in pq.read_table(experiment / "results/trials.parquet").to_pylist()
    }
    epochs = pq.read_table(experiment / "results/epochs.parquet").to_pylist()
    rows = trial_rows(experiment)
    for trial_id, lines in log.items():
        row = trials[trial_id]
        curve = [e["epoch"] for e in epochs if e["trial_id"] == trial_id]
        if trial_id in failed:
            fault_epoch = int(lines[0].split()[1].removeprefix("raised="))
            assert (row["status"], row["failure"], row["param_alpha"]) == ("failed", reason, ALWAYS)
            assert curve == list(range(1, fault_epoch))  # progress up to the fault is kept
        else:
            assert (row["status"], row["failure"], curve) == ("completed", None, [1, 2, 3, 4])
            # The retry went on from the checkpoint before the fault, not from scratch: the
            # journal keeps the first start's epochs and the retry trained the rest.
            fault_epoch = int(lines[0].split()[1].removeprefix("raised="))
            starts = [r["start"] for r in rows[f"{setting['name']}/{trial_id}"]]
            assert starts == [1] * (fault_epoch - 1) + [2] * (EPOCHS - fault_epoch + 1)
    best = json.loads((experiment / "results/best.json").read_text())["best"]
    assert best[setting["name"]]["trial_id"] not in failed

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("flaky").experiment_id
    children = {
        r.data.tags["jal.trial"].split("/")[1]: r
        for r in client.search_runs([exp_id])
        if r.data.tags.get("jal.role") == "trial"
    }
    assert set(children) == set(log)
    for trial_id, r in children.items():
        if trial_id in failed:
            assert (r.info.status, r.data.tags["jal.status"]) == ("FAILED", "failed")
            assert r.data.tags["jal.failure"] == reason
        else:
            assert (r.info.status, r.data.tags["jal.status"]) == ("FINISHED", "completed")
            assert "jal.failure" not in r.data.tags

    # The secret: nowhere on disk (experiment, tables, MLflow DB and artifacts, Ray's session
    # files and logs) nor in anything printed.
    results.export(experiment, tmp_path / "best.yaml")
    assert password not in run.stdout + run.stderr
    assert files_containing(password, tmp_path, ray_tmp) == []
