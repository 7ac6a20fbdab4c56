"""Fault 9: two drivers on one experiment. Two `jal-search run` of the same spec start at the
same moment, and a `resume` of the experiment starts while the first still runs. Promise: one
driver runs it, the others are refused with one line and exit 2 (the experiment's lock, or the
existing manifest), and nothing interleaves: one Tune run, one manifest, one set of MLflow runs.
"""

import signal
import time

import pytest
from faultkit import environment, jal, last_line, output, reported, start, wait_until, write_spec
from mlflow import MlflowClient

from jal_search.experiment import read_manifest
from jal_search.journal import JOURNAL, read_journal

LOCKED = "another jal-search process is running it"


@pytest.mark.slow
def test_a_second_driver_is_refused_and_never_interleaves(tmp_path, ray_tmp):
    # Long trials: the first driver must still hold the experiment while the others try.
    spec = write_spec(tmp_path, "shared", budget={"trials": 2, "epochs": 500})
    env = environment(ray_tmp)
    experiment = tmp_path / "runs" / "shared"
    args = ["run", str(spec), "--num-cpus", "2"]
    a, b = start(args, tmp_path / "a", env), start(args, tmp_path / "b", env)
    # Whichever gets the experiment runs it; the other must end, refused.
    deadline = time.monotonic() + 240
    while a.poll() is None and b.poll() is None:
        assert time.monotonic() < deadline, "both drivers still running"
        time.sleep(0.25)
    refused, first, logs = (
        (a, b, tmp_path / "a") if a.poll() is not None else (b, a, tmp_path / "b")
    )
    assert refused.returncode == 2
    wait_until(lambda: reported(experiment) >= 1, first, "the first result")
    err = output(logs)[1]
    assert "Traceback" not in err
    assert LOCKED in last_line(err) or "already exists" in last_line(err), last_line(err)
    created = read_manifest(experiment)["created"]

    third = jal("resume", str(experiment), "--num-cpus", "2", env=env)
    assert third.returncode == 2 and LOCKED in last_line(third.stderr), third.stderr[-2000:]
    assert "Traceback" not in third.stderr
    assert first.poll() is None  # the refusals did not disturb the driver that holds it

    first.send_signal(signal.SIGINT)  # no need to wait for 500 epochs: stop it cleanly
    assert first.wait(timeout=120) == 130
    manifest = read_manifest(experiment)
    assert manifest["created"] == created
    setting = experiment / manifest["settings"][0]["name"]
    assert len(list(experiment.glob("tune/experiment_state-*.json"))) == 1  # one Tune run
    trials = [p for p in setting.iterdir() if (p / JOURNAL).is_file()]
    assert len(trials) == 2
    for trial in trials:
        curve = [r["epoch"] for r in read_journal(trial)[1]]
        assert curve == list(range(1, len(curve) + 1))  # one writer: no epoch twice

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert [r.data.tags["jal.role"] for r in runs].count("setting") == 1
    assert {r.data.tags["jal.search"] for r in runs} == {f"shared@{created}"}
