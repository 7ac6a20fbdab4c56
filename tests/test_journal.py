"""A trial's own record: its journal and checkpoints, on real files (`journal.py`)."""

import json
import subprocess
import sys

import pytest
import torch

from jal_search.experiment import read_trials
from jal_search.journal import JOURNAL, Checkpoints, Journal, read_journal, sole_writer

HEADER = {"trial": "t00001", "setting": "symmetric-0.4", "params": {"alpha": 2.0}, "config": {}}


def rows(epochs):
    return [{"epoch": float(e), "val_acc": e / 10, "epoch_seconds": 0.5} for e in epochs]


def test_a_journal_holds_its_header_then_one_row_per_epoch(tmp_path):
    journal = Journal(tmp_path / "t00001")
    journal.open(HEADER, 0)
    for row in rows([1, 2, 3]):
        journal.append(row)
    header, read = read_journal(tmp_path / "t00001")
    assert header == {**HEADER, "starts": 1}
    assert [r["epoch"] for r in read] == [1.0, 2.0, 3.0]
    assert [r["start"] for r in read] == [1, 1, 1]
    assert all(isinstance(r["timestamp"], float) for r in read)  # when each epoch was recorded
    (record,) = read_trials(tmp_path.parent, tmp_path.name, {})
    assert record.trial_id == "t00001" and record.config == {"alpha": 2.0}
    assert [r["training_iteration"] for r in record.history] == [1, 2, 3]
    assert [r["time_total_s"] for r in record.history] == [0.5, 1.0, 1.5]


def test_a_half_written_line_is_ignored_and_gone_once_the_trial_restarts(tmp_path):
    # What a kill mid-append leaves; the next append must not be glued to it.
    folder = tmp_path / "t00001"
    journal = Journal(folder)
    journal.open(HEADER, 0)
    journal.append(rows([1])[0])
    with open(folder / JOURNAL, "a") as handle:
        handle.write('{"epoch": 2.0, "val_')
    assert [r["epoch"] for r in read_journal(folder)[1]] == [1.0]
    restarted = Journal(folder)
    restarted.open({**HEADER, "trial": "other"}, 1)  # the restart keeps the first header
    restarted.append(rows([2])[0])
    header, read = read_journal(folder)
    assert header == {**HEADER, "starts": 2}
    assert [(r["epoch"], r["start"]) for r in read] == [(1.0, 1), (2.0, 2)]  # who trained what
    assert all(json.loads(line) for line in (folder / JOURNAL).read_text().splitlines())


def test_a_restarted_trial_cuts_its_journal_back_to_the_checkpoint_it_resumes_from(tmp_path):
    # Rows appended after the newest checkpoint are retrained: each epoch stays recorded once.
    folder = tmp_path / "t00001"
    journal = Journal(folder)
    journal.open(HEADER, 0)
    for row in rows([1, 2, 3]):
        journal.append(row)
    Journal(folder).open(HEADER, 2)
    assert [r["epoch"] for r in read_journal(folder)[1]] == [1.0, 2.0]
    Journal(folder).open(HEADER, 0)  # no readable checkpoint: from the start
    assert read_journal(folder) == ({**HEADER, "starts": 3}, [])


def test_checkpoints_keep_the_newest_two_and_fall_back_past_a_damaged_one(tmp_path, recwarn):
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest() is None
    for epoch in (1, 2, 3):
        checkpoints.save({"epoch": epoch, "w": torch.full((2,), float(epoch))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    assert checkpoints.latest()["epoch"] == 3
    (tmp_path / "checkpoint-000003" / "state.pt").write_bytes(b"PK\x03\x04 cut")
    state = checkpoints.latest()
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
    assert any("checkpoint-000003" in str(w.message) for w in recwarn)


def test_a_folder_without_a_journal_is_not_a_trial(tmp_path):
    # E.g. a folder left by an older version, or one a user made: only journals make trials.
    Checkpoints(tmp_path / "s" / "t00000").save({"epoch": 1})
    Journal(tmp_path / "s" / "t00001").open(HEADER, 0)
    assert [r.trial_id for r in read_trials(tmp_path, "s", {})] == ["t00001"]


def test_a_trial_folder_has_one_writer_at_a_time(tmp_path):
    # Another process holds the folder, as a worker orphaned by a killed driver would while it
    # finishes its epoch: a new start of the trial waits for it to let go, or fails after wait_s.
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom jal_search.journal import sole_writer\n"
        "with sole_writer(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(2)\n"
        "    Path(sys.argv[1], 'letting-go').touch()  # the last thing it does holding the lock\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TimeoutError, match="another process still writes this trial"):
        with sole_writer(tmp_path, wait_s=0.2):
            pass
    with sole_writer(tmp_path, wait_s=30):
        assert (tmp_path / "letting-go").exists()  # only once the holder let go
    holder.wait()
    holder.stdout.close()
