"""A packed search (`pack: K`) whose driver is SIGKILLed: `resume` continues every unfinished pack
from its last checkpoint — all members' weights, momentum and histories — never from epoch 1."""

import os
import signal

import pytest
from faultkit import environment, jal, start, trial_epochs, wait_until, write_spec

from jal_search.experiment import read_trials

EPOCHS = 12


@pytest.mark.slow
def test_a_killed_packed_search_resumes_its_packs_from_their_checkpoints(tmp_path, ray_tmp):
    spec = write_spec(
        tmp_path, "packs", budget={"trials": 4, "epochs": EPOCHS}, pack=2,
        searcher={"type": "random", "seed": 1},
    )  # fmt: skip
    env = environment(ray_tmp)
    experiment = tmp_path / "runs" / "packs"
    driver = start(["run", str(spec), "--num-cpus", "2"], tmp_path / "run", env)

    def midway() -> bool:
        return any(3 <= max(e, default=0) < EPOCHS for e in trial_epochs(experiment).values())

    wait_until(midway, driver, "a pack got three epochs in")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = trial_epochs(experiment)

    out = jal("resume", str(experiment), "--num-cpus", "2", env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = trial_epochs(experiment)
    assert set(after) == set(before) and len(after) == 2  # 4 configs in 2 packs
    for trial, rows in after.items():
        # Continued from its last checkpoint (an epoch reported after that checkpoint was saved
        # may run again), never restarted from epoch 1.
        assert rows[: len(before[trial])] == before[trial]
        assert rows.count(1) == 1 and sorted(set(rows)) == list(range(1, EPOCHS + 1))
        assert rows[-1] == EPOCHS
    members = read_trials(experiment, "symmetric-0.4", {})
    assert len(members) == 4 and all(m.status(EPOCHS, True) == "completed" for m in members)
