"""The training loop: it learns, it resumes exactly, it stops diverged runs, it stays Ray-free."""

import copy
import math
import subprocess
import sys

import pytest
import torch

from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.train import (
    CheckpointError,
    load_checkpoint,
    pick_device,
    prepare_data,
    run_trial,
    save_checkpoint,
)

DIGITS = dict(dataset="digits", epochs=4, seed=7)


def test_learns_digits_with_the_jal_loss():
    result = run_trial(TrialConfig(**DIGITS, loss="jal_ce", noise_type="clean"))
    assert result.status == "completed"
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["test_acc"] > 0.85
    assert result.history[-1]["val_acc"] > 0.85
    assert math.isnan(result.history[-1]["memorized"])  # no wrong labels to memorise


def test_resume_from_a_checkpoint_continues_exactly():
    config = TrialConfig(**DIGITS, loss="gce", noise_type="symmetric", noise_rate=0.4)
    states = []
    # The state aliases the live model (saving it is the hook's job), so keep a copy.
    straight = run_trial(config, report=lambda metrics, state: states.append(copy.deepcopy(state)))
    resumed = run_trial(config, resume=states[1])  # the state after epoch 2
    assert len(resumed.history) == 4  # the first two come from the checkpoint
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "val_acc", "test_acc", "noisy_fit"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_resume_refuses_a_checkpoint_of_other_noisy_labels():
    states = []
    run_trial(
        TrialConfig(**DIGITS, noise_type="symmetric", noise_rate=0.2),
        report=lambda m, s: states.append(s),
    )
    other = TrialConfig(**DIGITS, noise_type="symmetric", noise_rate=0.4)
    with pytest.raises(UserError, match="different noisy labels"):
        run_trial(other, resume=states[0])


def test_a_diverged_loss_ends_the_trial_with_its_status():
    result = run_trial(TrialConfig(dataset="digits", loss="ce", lr=1e6, epochs=3))
    assert result.status == "diverged"
    assert len(result.history) < 3
    assert result.history[-1]["diverged"] == 1.0
    assert math.isnan(result.history[-1]["val_acc"])  # never a candidate for "best"


def test_validation_labels_are_noisy_unless_asked_clean():
    base = dict(DIGITS, loss="ce", noise_type="symmetric", noise_rate=0.6)
    noisy = run_trial(TrialConfig(**base, val_labels="noisy")).history[-1]
    clean = run_trial(TrialConfig(**base, val_labels="clean")).history[-1]
    # Same seed, same training: only the labels the held-out images are scored against differ.
    assert noisy["test_acc"] == clean["test_acc"]
    assert clean["val_acc"] > noisy["val_acc"] + 0.2


def test_noisy_labels_are_built_once_per_setting_and_hashed():
    config = TrialConfig(**DIGITS, noise_type="symmetric", noise_rate=0.4).resolve()
    data = prepare_data(config)
    assert prepare_data(config) is data  # reused processes do not rebuild the noise
    wrong = (data.noisy_labels != data.clean_labels).float().mean().item()
    assert wrong == pytest.approx(data.noise_rate)
    assert 0.3 < wrong <= 0.4
    assert len(set(data.train_idx) & set(data.val_idx)) == 0
    other = prepare_data(config.model_copy(update={"noise_seed": 99}))
    assert other.label_hash != data.label_hash


def test_checkpoint_round_trip_and_truncation(tmp_path):
    state = {
        "epoch": 3,
        "model": {"w": torch.arange(4.0)},
        "label_hash": "ab",
        "history": [{"a": 1.0}],
    }
    save_checkpoint(state, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    path = tmp_path / "state.pt"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_device_is_cpu_without_cuda():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")


def test_the_loop_imports_neither_ray_nor_mlflow():
    code = "import sys, jal_search.train; print(sorted({'ray', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
