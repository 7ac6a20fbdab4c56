"""A packed search (`pack: K`) whose driver is SIGKILLed: `resume` continues every unfinished pack
from its last checkpoint — all members' weights, momentum and histories — never from epoch 1."""

import os
import signal

import pytest
from faultkit import environment, jal, start, trial_epochs, trial_rows, wait_until, write_spec

from jal_search.experiment import read_trials

EPOCHS = 24  # a pack is still mid-way when the driver is killed


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
    after = trial_rows(experiment)
    assert set(after) == set(before) and len(after) == 4  # 4 configs in 2 packs, a journal each
    for member, rows in after.items():
        assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
        # Continued from its pack's last checkpoint, never restarted from epoch 1: the epochs
        # trained before the kill stay as the first start recorded them.
        if max(before[member], default=0) >= 2:
            assert rows[0]["start"] == 1 and rows[-1]["start"] == 2
    members = read_trials(experiment, "symmetric-0.4", {})
    assert len(members) == 4 and all(m.status(EPOCHS, True) == "completed" for m in members)
