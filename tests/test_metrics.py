"""One definition of the per-epoch metrics (`metrics.py`), used by every loop, table and tracker."""

import math

import numpy as np
import pytest

from jal_search import metrics, results, tracking, tune_adapter
from jal_search.config import TrialConfig
from jal_search.noise import transition_matrix, validation_transition
from jal_search.packed import run_packed
from jal_search.train import run_trial

ROW = dict(
    epoch=3,
    train_loss=0.5,
    noisy_fit=0.6,
    memorized=0.1,
    val_counts=np.array([[6, 2], [1, 1]]),  # accuracy 7/10
    test_counts=np.array([[9, 0], [1, 0]]),  # 9/10
    transition=np.eye(2),
    lr=0.01,
    noise_realised=0.4,
    epoch_seconds=1.5,
    bf16=False,
)


def test_a_row_holds_exactly_the_defined_metrics_and_a_diverged_epoch_scores_nan():
    row = metrics.epoch_metrics(**ROW)
    assert tuple(row) == metrics.NAMES
    assert row["epoch"] == 3.0 and row["diverged"] == 0.0
    assert (row["val_acc"], row["test_acc"]) == (0.7, 0.9)
    assert row["val_acc_clean_est"] == 0.7  # clean validation labels: T = I
    broken = metrics.epoch_metrics(**{**ROW, "train_loss": math.inf})
    assert broken["diverged"] == 1.0
    for key in ("val_acc", "test_acc", "val_acc_clean_est", "val_acc_clean_lo"):
        assert math.isnan(broken[key]), key
    unknown = metrics.epoch_metrics(**{**ROW, "transition": None})
    assert unknown["val_acc"] == 0.7 and math.isnan(unknown["val_acc_clean_est"])


def test_both_loops_report_the_defined_metrics():
    config = TrialConfig(
        dataset="digits", epochs=1, loss="ce", noise_type="symmetric", noise_rate=0.2
    )
    (alone,) = run_trial(config).history
    (packed,) = run_packed([config, config.model_copy(update={"seed": 7})])[0].history
    assert tuple(alone) == tuple(packed) == metrics.NAMES


def test_an_epoch_that_skips_the_test_set_has_no_test_acc_and_a_diverged_one_a_nan():
    skipped = metrics.epoch_metrics(**{**ROW, "test_counts": None})
    assert "test_acc" not in skipped and skipped["val_acc"] == 0.7
    broken = metrics.epoch_metrics(**{**ROW, "test_counts": None, "train_loss": math.nan})
    assert math.isnan(broken["test_acc"])


def test_the_test_set_is_evaluated_at_the_listed_epochs_and_the_last_or_every_epoch():
    config = TrialConfig(epochs=8, test_epochs=(1, 6))
    assert [e for e in range(1, 9) if metrics.evaluates_test_set(e, config)] == [1, 6, 8]
    every = config.model_copy(update={"test_epochs": None})
    assert all(metrics.evaluates_test_set(e, every) for e in range(1, 9))


def test_both_loops_evaluate_the_test_set_by_the_rule_and_as_every_epoch_would():
    base = TrialConfig(
        dataset="digits", epochs=3, loss="ce", noise_type="symmetric", noise_rate=0.4
    )
    scheduled = base.model_copy(update={"test_epochs": (1,)})
    other = base.model_copy(update={"seed": 9, "test_epochs": ()})
    packed = run_packed([scheduled, other])
    every = run_packed([base, other.model_copy(update={"test_epochs": None})])
    for history, full, tested in (
        (run_trial(scheduled).history, run_trial(base).history, [1.0, 3.0]),
        (packed[0].history, every[0].history, [1.0, 3.0]),
        (packed[1].history, every[1].history, [3.0]),
    ):
        assert [h["epoch"] for h in history if "test_acc" in h] == tested
        # evaluating or not changes no training: the values are the every-epoch run's
        assert [h.get("test_acc", full[i]["test_acc"]) for i, h in enumerate(history)] == [
            h["test_acc"] for h in full
        ]
        assert [h["val_acc"] for h in history] == [h["val_acc"] for h in full]


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


def clean_confusion(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """Random clean-label confusion counts [true, predicted] of n samples, mostly right."""
    weights = rng.random((k, k)) + np.eye(k) * 3 * k
    return rng.multinomial(n, (weights / weights.sum()).ravel()).reshape(k, k)


@pytest.mark.parametrize(
    ("noise", "rate", "k", "dataset"),
    [
        ("symmetric", 0.6, 10, None),
        ("asymmetric", 0.3, 10, "cifar10"),
        ("asymmetric", 0.4, 7, None),
    ],
)
def test_the_clean_estimate_inverts_the_noise_exactly_in_expectation(noise, rate, k, dataset):
    """With the noisy counts their expectation N = Tᵀ·C, the estimate is C's own accuracy."""
    rng = np.random.default_rng(1)
    t = transition_matrix(noise, rate, k, dataset)
    clean = clean_confusion(rng, k, 5000)
    noisy = t.T @ clean  # N[noisy, predicted] = Σ_true T[true, noisy]·C[true, predicted]
    est, lo, hi = metrics.clean_accuracy(noisy, t)
    assert est == pytest.approx(np.trace(clean) / clean.sum(), abs=1e-12)
    assert lo < est < hi
    if noise == "symmetric":  # the closed form: noisy = clean·(1−η) + (1−clean)·η/(K−1)
        acc = np.trace(noisy) / noisy.sum()
        direct = (acc - rate / (k - 1)) / (1 - rate - rate / (k - 1))
        assert est == pytest.approx(direct, abs=1e-12)
        # the interval: the noisy accuracy's Wald interval through the same (affine) map
        half = metrics.Z95 * math.sqrt(acc * (1 - acc) / noisy.sum()) / (1 - rate - rate / (k - 1))
        assert (lo, hi) == pytest.approx((est - half, est + half), abs=1e-12)


def test_the_interval_covers_the_clean_accuracy_about_95_percent_of_the_time():
    """Sampled noisy labels (each flipped through T) on a fixed set of clean labels and
    predictions: the interval holds the true clean accuracy in about 95% of 2,000 draws."""
    rng = np.random.default_rng(2)
    k, n = 10, 800
    t = transition_matrix("asymmetric", 0.4, k, "cifar10")
    true = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < 0.7, true, rng.integers(0, k, n))
    truth = float(np.mean(true == predicted))
    cumulative = t.cumsum(1)[true]
    hits = 0
    for _ in range(2000):
        noisy = (rng.random(n)[:, None] > cumulative).sum(1)
        counts = np.zeros((k, k), dtype=np.int64)
        np.add.at(counts, (noisy, predicted), 1)
        _, lo, hi = metrics.clean_accuracy(counts, t)
        hits += lo <= truth <= hi
    assert 0.93 <= hits / 2000 <= 0.97


def test_the_estimate_is_defined_only_where_t_is_known():
    assert np.array_equal(validation_transition("symmetric", 0.4, 3, "digits", "clean"), np.eye(3))
    assert np.array_equal(validation_transition("clean", 0.0, 3, "digits", "noisy"), np.eye(3))
    assert validation_transition("dependent", 0.4, 10, "cifar10", "noisy") is None
    assert validation_transition("human", "worst", 10, "cifar10", "noisy") is None
    singular = transition_matrix("symmetric", 0.9, 10)  # η = (K−1)/K: labels carry no signal
    assert all(math.isnan(v) for v in metrics.clean_accuracy(np.eye(10) * 5, singular))
