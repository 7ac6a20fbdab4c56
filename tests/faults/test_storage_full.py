"""Fault 6: the disk under the storage path fills up while a search runs. Promise: the driver
stops with one clear line (exit 2) while Tune's files are still whole, `results` on the full
disk fails the same way without leaving a partial table, no checkpoint, manifest or result line
is damaged, and after space is freed `resume` completes the search, keeping finished trials.

The disk is a real 96 MiB tmpfs mounted for the test (root only: skipped otherwise); another
"user" fills it with a ballast file, first to below the search's reserve, then completely.
"""

import json
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from faultkit import (
    environment,
    finished,
    jal,
    last_line,
    output,
    start,
    trial_epochs,
    trial_rows,
    wait_until,
    write_spec,
)

from jal_search.experiment import STORAGE_RESERVE, read_manifest
from jal_search.train import load_checkpoint

EPOCHS, TRIALS = 20, 8  # enough left to run when the disk fills, even on a fast machine


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk, name, leave):
    """Write a ballast file leaving `leave` bytes free (0: as full as the disk gets)."""
    free = shutil.disk_usage(disk).free
    with open(disk / name, "wb", buffering=0) as f:
        f.write(bytes(max(free - leave, 0)))
        while not leave:  # top up until the kernel says no
            try:
                f.write(bytes(4096))
            except OSError:
                break


@pytest.mark.slow
def test_a_full_disk_stops_the_search_cleanly_and_resume_completes_it(
    tmp_path, ray_tmp, small_disk
):
    spec = write_spec(
        tmp_path, "full", storage_path=str(small_disk), budget={"trials": TRIALS, "epochs": EPOCHS}
    )
    env = environment(ray_tmp)
    experiment = small_disk / "full"
    driver = start(["run", str(spec), "--num-cpus", "2"], tmp_path / "run", env)
    wait_until(lambda: finished(experiment, EPOCHS), driver, "a finished trial")
    fill(small_disk, "ballast", leave=STORAGE_RESERVE // 4)

    assert driver.wait(timeout=120) == 2
    err = output(tmp_path / "run")[1]
    assert last_line(err).startswith("jal-search: error: storage_path: no space left under")
    assert f"jal-search resume {experiment}" in last_line(err)
    assert read_manifest(experiment)["settings"][0]["status"] == "running"  # not done: resumable
    before = trial_epochs(experiment)
    done_before = finished(experiment, EPOCHS)
    assert 1 <= len(done_before) < TRIALS

    # Completely full: writing the tables fails in one line and leaves no partial file.
    fill(small_disk, "ballast2", leave=0)
    tables = jal("results", str(experiment), env=env)
    assert tables.returncode == 2, tables.stderr[-2000:]
    assert "Traceback" not in tables.stderr and tables.stderr.count("\n") == 1
    assert "cannot write it" in tables.stderr
    folder = experiment / "results"
    assert (list(folder.iterdir()) if folder.exists() else []) == []  # not even a temporary file

    # Nothing the search left is damaged: every checkpoint loads, every journal line parses but
    # for a last one the full disk cut short (read_journal skips it; a restart removes it).
    for state in experiment.glob("*/*/checkpoint-*"):
        assert load_checkpoint(state)["epoch"] >= 1
    for journal in experiment.glob("*/*/journal.jsonl"):
        assert all(json.loads(line) for line in journal.read_text().splitlines()[:-1])
    read_manifest(experiment)

    for ballast in ("ballast", "ballast2"):
        (small_disk / ballast).unlink()
    resumed = jal("resume", str(experiment), "--num-cpus", "2", env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = trial_epochs(experiment)
    assert len(after) == TRIALS and all(c[-1] == EPOCHS for c in after.values())
    rows = trial_rows(experiment)
    for trial, curve in done_before.items():  # finished before the disk filled: kept, not rerun
        assert after[trial] == curve and {r["start"] for r in rows[trial]} == {1}
    for trial, curve in before.items():
        assert after[trial][: len(curve)] == curve  # the others continued, nothing lost
    tables = jal("results", str(experiment), env=env)
    assert tables.returncode == 0, tables.stderr[-2000:]
    rows = pq.read_table(experiment / "results/trials.parquet").to_pylist()
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", EPOCHS)] * TRIALS
