"""Packed searches (`pack: K`) under faults: the driver SIGKILLed (then `resume`), and a pack
worker SIGKILLed mid-search. Either way every trial continues from its own last checkpoint in a
pack worker: no epoch lost, none rerun from epoch 1."""

import os
import signal

import pytest
from faultkit import environment, jal, start, trial_epochs, trial_rows, wait_until, write_spec

from jal_search.experiment import read_manifest, read_trials

EPOCHS = 24  # trials are still mid-way when the fault comes


def _start_midway(tmp_path, ray_tmp, name):
    """A packed search of 4 trials started in the background and waited for until a trial is
    three epochs in: (its experiment folder, the driver process, the environment)."""
    spec = write_spec(
        tmp_path, name, budget={"trials": 4, "epochs": EPOCHS}, pack=2,
        searcher={"type": "random", "seed": 1}, max_concurrent_trials=4,
    )  # fmt: skip
    env = environment(ray_tmp)
    experiment = tmp_path / "runs" / name
    driver = start(["run", str(spec), "--num-cpus", "2"], tmp_path / "run", env)

    def midway() -> bool:
        return any(3 <= max(e, default=0) < EPOCHS for e in trial_epochs(experiment).values())

    wait_until(midway, driver, "a trial got three epochs in")
    return experiment, driver, env


def _continued(before, after, hit):
    """Every trial ran its whole budget once; those the fault `hit` that had epochs before it
    kept them as their first start recorded them, and continued in a later start."""
    for trial, rows in after.items():
        assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1)), trial
        if trial in hit and len(before[trial]) >= 2:
            assert rows[0]["start"] == 1 and rows[-1]["start"] >= 2, trial


@pytest.mark.slow
def test_a_killed_packed_search_resumes_every_trial_from_its_checkpoint(tmp_path, ray_tmp):
    experiment, driver, env = _start_midway(tmp_path, ray_tmp, "packs")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = trial_rows(experiment)

    out = jal("resume", str(experiment), "--num-cpus", "2", env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = trial_rows(experiment)
    assert set(before) <= set(after) and len(after) == 4
    _continued(before, after, hit=set(before))
    trials = read_trials(experiment, "symmetric-0.4", {})
    assert len(trials) == 4 and all(t.status(EPOCHS, True) == "completed" for t in trials)


@pytest.mark.slow
def test_a_killed_pack_worker_costs_its_trials_no_epoch(tmp_path, ray_tmp):
    experiment, driver, _ = _start_midway(tmp_path, ray_tmp, "worker")
    before = trial_rows(experiment)
    # The worker training the furthest trial: its process wrote that trial's rows.
    furthest = max(before.values(), key=len)
    victim = int(furthest[-1]["pid"])
    os.kill(victim, signal.SIGKILL)
    assert driver.wait(timeout=600) == 0, (tmp_path / "run.err").read_text()[-2000:]
    after = trial_rows(experiment)
    assert len(after) == 4
    # The trials in the killed worker then: they went on in another (or the restarted) one.
    hit = {t for t, rows in before.items() if rows and int(rows[-1]["pid"]) == victim}
    assert hit
    _continued(before, after, hit)
    for t in hit:
        assert int(after[t][-1]["pid"]) != victim
    (setting,) = read_manifest(experiment)["settings"]
    assert setting["status"] == "done" and setting["failures"] == {}
