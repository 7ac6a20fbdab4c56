"""One definition of the per-epoch metrics (`metrics.py`), used by every loop, table and tracker."""

import math

from jal_search import metrics, results, tracking, tune_adapter
from jal_search.config import TrialConfig
from jal_search.packed import run_packed
from jal_search.train import run_trial

ROW = dict(
    epoch=3,
    train_loss=0.5,
    noisy_fit=0.6,
    memorized=0.1,
    val_acc=0.7,
    test_acc=0.9,
    lr=0.01,
    noise_realised=0.4,
    epoch_seconds=1.5,
    bf16=False,
)


def test_a_row_holds_exactly_the_defined_metrics_and_a_diverged_epoch_scores_nan():
    row = metrics.epoch_metrics(**ROW)
    assert tuple(row) == metrics.NAMES
    assert row["epoch"] == 3.0 and row["diverged"] == 0.0 and row["val_acc"] == 0.7
    broken = metrics.epoch_metrics(**{**ROW, "train_loss": math.inf})
    assert broken["diverged"] == 1.0
    assert math.isnan(broken["val_acc"]) and math.isnan(broken["test_acc"])


def test_both_loops_report_the_defined_metrics():
    config = TrialConfig(
        dataset="digits", epochs=1, loss="ce", noise_type="symmetric", noise_rate=0.2
    )
    (alone,) = run_trial(config).history
    (packed,) = run_packed([config, config.model_copy(update={"seed": 7})])[0].history
    assert tuple(alone) == tuple(packed) == metrics.NAMES


def test_tables_tracking_and_progress_take_their_metrics_from_the_definition():
    epochs = results.schema("e", []).names
    trials = results.schema("t", []).names
    for m in metrics.METRICS:
        if m.tables:  # (`epoch` and `diverged` have typed columns of their own)
            assert (m.name in epochs) == ("e" in m.tables), m.name
        assert (f"final_{m.name}" in trials) == m.final, m.name
        assert (m.name in tracking.METRICS) == m.tracked, m.name
        assert (m.name in tune_adapter.PROGRESS_METRICS) == m.progress, m.name
    assert [m.name for m in metrics.METRICS if m.selectable] == [results.METRIC]
