"""Fault 5: the MLflow server dies while a search runs, and comes back. Promise: no trial
fails, the driver warns (one line, no credentials) and catches up, `jal-search sync`
completes, and MLflow ends with every run and every metric step exactly once, matching the
files on disk. The credentials the client sends (MLFLOW_TRACKING_USERNAME/PASSWORD) appear in
no output and no file.

The server is a real `mlflow server` process (tests/mlflow_server.py), stopped with SIGTERM
and restarted on the same port and database.
"""

import secrets

import pytest
from faultkit import (
    environment,
    files_containing,
    jal,
    output,
    reported,
    start,
    trial_rows,
    wait_until,
    write_spec,
)
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from jal_search.experiment import read_manifest
from jal_search.tracking import METRICS

EPOCHS = 6


@pytest.mark.slow
def test_search_survives_an_mlflow_outage_and_sync_completes_it(tmp_path, ray_tmp):
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        password = secrets.token_hex(16)
        env = environment(
            ray_tmp, MLFLOW_TRACKING_USERNAME="jal", MLFLOW_TRACKING_PASSWORD=password
        )
        spec = write_spec(tmp_path, "outage", budget={"trials": 4, "epochs": EPOCHS})
        experiment = tmp_path / "runs" / "outage"
        args = ["run", str(spec), "--num-cpus", "2", "--tracking-uri", server.uri]
        driver = start(args, tmp_path / "run", env)
        wait_until(lambda: reported(experiment) >= 2, driver, "the first results")
        server.stop()  # results keep coming while it is down
        wait_until(lambda: reported(experiment) >= 6, driver, "results during the outage")
        server.start()
        assert driver.wait(timeout=300) == 0
        out, err = output(tmp_path / "run")
        setting = read_manifest(experiment)["settings"][0]
        assert setting["status"] == "done" and setting["failures"] == {}
        warnings = [line for line in (out + err).splitlines() if "MLflow" in line]
        assert any(line.startswith("warning: MLflow") for line in warnings), warnings

        synced = jal("sync", str(experiment), "--tracking-uri", server.uri, env=env)
        assert synced.returncode == 0, synced.stderr[-2000:]
        again = jal("sync", str(experiment), "--tracking-uri", server.uri, env=env)
        assert "0 runs created, 0 params and 0 metric points logged" in again.stdout

        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        children = [r for r in runs if r.data.tags.get("jal.role") == "trial"]
        on_disk = trial_rows(experiment)
        assert sorted(r.data.tags["jal.trial"] for r in children) == sorted(on_disk)
        for r in children:
            assert (r.info.status, r.data.tags["jal.status"]) == ("FINISHED", "completed")
            rows = on_disk[r.data.tags["jal.trial"]]
            for key in METRICS:  # every epoch that has it (test_acc: the last), once
                steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                assert sorted(steps) == [int(row["epoch"]) for row in rows if key in row], key
        parents = [r for r in runs if r.data.tags.get("jal.role") == "setting"]
        assert [p.info.status for p in parents] == ["FINISHED"]

        texts = [out, err, synced.stdout, synced.stderr, again.stdout, again.stderr]
        assert not any(password in text for text in texts)
        assert files_containing(password, tmp_path, ray_tmp) == []
    finally:
        server.stop()
