"""Faults 8 and 7: Ctrl-C stops the driver mid-search, then the checkpoints of its unfinished
trials are damaged (truncated) while it is stopped. Promises: a clean stop (exit 130, the
interrupted setting left unfinished and the next one not started), every port the private Ray
opened listens on 127.0.0.1 only, and `resume` completes the search: a damaged checkpoint
costs its trial's progress (it restarts from epoch 0, with a warning), never the search.
"""

import signal

import pyarrow.parquet as pq
import pytest
from faultkit import (
    descendants,
    environment,
    finished,
    jal,
    last_line,
    listening,
    loopback,
    output,
    reported,
    start,
    trial_epochs,
    trial_rows,
    wait_until,
    write_spec,
)

from jal_search import results
from jal_search.experiment import read_manifest

EPOCHS = 30  # ~3 s per trial: the first setting is still training when Ctrl-C comes


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_survives_damaged_checkpoints(tmp_path, ray_tmp):
    spec = write_spec(
        tmp_path,
        "stopped",
        noise={"symmetric": [0.4], "asymmetric": [0.2]},
        budget={"trials": 2, "epochs": EPOCHS},
    )
    env = environment(ray_tmp)
    experiment = tmp_path / "runs" / "stopped"
    driver = start(["run", str(spec), "--num-cpus", "2"], tmp_path / "run", env)
    wait_until(lambda: reported(experiment) >= 2, driver, "the first epochs")

    # Security default: the private Ray of `jal-search run` listens on loopback only.
    sockets = listening(descendants(driver.pid))
    assert sockets, "found no listening socket of the driver's Ray"
    exposed = [s for s in sockets if not loopback(s[2])]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"

    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130
    out, err = output(tmp_path / "run")
    assert last_line(err).startswith(
        "jal-search: interrupted (an interrupted search continues with"
    )
    settings = read_manifest(experiment)["settings"]
    assert [s["status"] for s in settings] == ["running", "pending"]
    assert not (experiment / settings[1]["name"]).exists()  # the next one never started

    before = trial_epochs(experiment)
    done_before = finished(experiment, EPOCHS)
    damaged = set()
    for trial in set(before) - set(done_before):
        for state in (experiment / trial).glob("checkpoint-*/state.pt"):
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
            damaged.add(trial)
    assert damaged, "no unfinished trial had a checkpoint to damage"

    resumed = jal("resume", str(experiment), "--num-cpus", "2", env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Each damaged checkpoint is named in a warning; with none readable left, the trial restarts.
    warnings = [line for line in resumed.stderr.splitlines() if "unreadable checkpoint" in line]
    assert all(any(f"/{t}/checkpoint-" in w for t in damaged) for w in warnings)
    assert {t for t in damaged if any(f"/{t}/checkpoint-" in w for w in warnings)} == damaged
    assert any("restarting the trial from epoch 0" in w for w in warnings)

    after = trial_epochs(experiment)
    assert len(after) == 4 and all(curve == list(range(1, EPOCHS + 1)) for curve in after.values())
    rows = trial_rows(experiment)
    for trial, curve in done_before.items():
        assert after[trial] == curve and {r["start"] for r in rows[trial]} == {1}  # not rerun
    for trial in damaged:
        assert {r["start"] for r in rows[trial]} == {2}  # every epoch retrained by the restart
    assert [s["status"] for s in read_manifest(experiment)["settings"]] == ["done", "done"]

    # The tables count the epochs the final model trained.
    results.write_tables(experiment)
    trials = pq.read_table(experiment / "results/trials.parquet").to_pylist()
    assert [(t["status"], t["epochs"]) for t in trials] == [("completed", EPOCHS)] * 4
    epochs = pq.read_table(experiment / "results/epochs.parquet").to_pylist()
    for t in trials:
        key = (t["setting"], t["trial_id"])  # trials are named within their setting
        curve = [e["epoch"] for e in epochs if (e["setting"], e["trial_id"]) == key]
        assert curve == list(range(1, EPOCHS + 1))
    assert "best config per noise setting" in out + resumed.stdout
