"""The per-epoch metrics: one definition for the training loops, the journals, the tables, MLflow
and the progress table.

`epoch_metrics` builds the row both loops (`train.run_trial`, `packed.run_packed`) report, so a
new metric is one `Metric` here and one argument there; `METRICS` says for each what it means,
whether the search may select on it, whether MLflow logs it per epoch, and where the parquet
tables carry it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jal_search.config import TrialConfig

import numpy as np

SELECTION = "val_acc"  # the one metric the search selects on (test_acc is reported only)


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    tracked: bool = True  # MLflow logs it per epoch (step = epoch)
    tables: str = "e"  # the parquet tables with a float column of it: e = epochs, t = trials
    final: bool = False  # the trials table also has `final_<name>`, its value at the last epoch
    progress: bool = False  # a column of the live progress table

    @property
    def selectable(self) -> bool:
        return self.name == SELECTION


METRICS: tuple[Metric, ...] = (
    Metric("epoch", "epochs completed (1-based)", tracked=False, tables=""),  # every other's step
    Metric(
        "train_loss",
        "mean training loss over the epoch's batches, the L1 term excluded (NaN: diverged)",
        final=True,
    ),
    Metric(
        "noisy_fit",
        "fraction of training samples predicted (during the epoch, on the augmented batch) as "
        "their noisy label",
        final=True,
        progress=True,
    ),
    Metric(
        "memorized",
        "among training samples whose noisy label is wrong, the fraction predicted as that wrong "
        "label: the memorisation robust losses resist (NaN without noise)",
        final=True,
    ),
    Metric(
        "val_acc",
        "accuracy on the held-out split against its labels (noisy unless val_labels: clean); "
        "the selection metric (NaN when val_fraction is 0)",
        final=True,
        progress=True,
    ),
    Metric(
        "val_acc_clean_est",
        "estimated accuracy on the validation split's clean labels, from its noisy-label "
        "confusion counts and the setting's transition matrix T (`clean_accuracy`); equals "
        "val_acc for clean validation labels; NaN where T is unknown (dependent, human noise). "
        "Reported only: selection stays on val_acc",
        final=True,
    ),
    Metric("val_acc_clean_lo", "lower end of val_acc_clean_est's 95% interval", final=True),
    Metric("val_acc_clean_hi", "upper end of val_acc_clean_est's 95% interval", final=True),
    Metric(
        "test_acc",
        "clean test accuracy (reported, never used to select)",
        final=True,
        progress=True,
    ),
    Metric("lr", "learning rate used in the epoch"),
    Metric(
        "noise_realised",
        "realised fraction of wrong training labels (constant over epochs)",
        tracked=False,
        tables="et",
    ),
    Metric("epoch_seconds", "wall time of the epoch's training and evaluation"),
    # 1.0 / 0.0 flags: the tables turn `diverged` into a boolean column of their own.
    Metric(
        "diverged",
        "the epoch's loss was not finite (the trial ends there)",
        tracked=False,
        tables="",
    ),
    Metric("bf16", "the forward ran under bf16 autocast", tracked=False, tables=""),
)
NAMES = tuple(m.name for m in METRICS)


def epoch_metrics(
    *,
    epoch: int,
    train_loss: float,
    noisy_fit: float,
    memorized: float,
    val_counts: np.ndarray | None,
    test_counts: np.ndarray | None,
    transition: np.ndarray | None,
    lr: float,
    noise_realised: float,
    epoch_seconds: float,
    bf16: bool,
) -> dict[str, float]:
    """One epoch's row, as every loop reports it.

    `val_counts` / `test_counts` are the confusion counts [label, predicted] of the evaluation
    (None: not evaluated; an epoch that did not evaluate the test set (`evaluates_test_set`) has no
    `test_acc`); `transition` is the validation labels' T (None: unknown). A non-finite loss marks
    the epoch diverged, and its accuracies NaN (the model it evaluated is no model)."""
    diverged = not math.isfinite(train_loss)
    val = None if diverged else val_counts
    test = None if diverged else test_counts
    clean = clean_accuracy(val, transition) if val is not None and transition is not None else None
    est, lo, hi = clean or (math.nan, math.nan, math.nan)
    tested = {"test_acc": accuracy(test)} if diverged or test is not None else {}
    return {
        "epoch": float(epoch),
        "train_loss": train_loss,
        "noisy_fit": noisy_fit,
        "memorized": memorized,
        "val_acc": accuracy(val),
        "val_acc_clean_est": est,
        "val_acc_clean_lo": lo,
        "val_acc_clean_hi": hi,
        **tested,
        "lr": lr,
        "noise_realised": noise_realised,
        "epoch_seconds": epoch_seconds,
        "diverged": float(diverged),
        "bf16": float(bf16),
    }


def evaluates_test_set(epoch: int, config: TrialConfig) -> bool:
    """Whether epoch `epoch` (1-based) evaluates the test set: every epoch when
    `config.test_epochs` is None; else its listed epochs (a search's rungs, where a trial may be
    stopped) and the last — the epochs whose test_acc a trial's last row can hold."""
    return config.test_epochs is None or epoch == config.epochs or epoch in config.test_epochs


def accuracy(counts: np.ndarray | None) -> float:
    """Top-1 accuracy from confusion counts [label, predicted]; NaN when None or empty."""
    total = 0 if counts is None else int(counts.sum())
    return int(np.trace(counts)) / total if total else math.nan


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def clean_accuracy(counts: np.ndarray, transition: np.ndarray) -> tuple[float, float, float]:
    """(estimate, low, high): the accuracy against clean labels that noisy-label confusion counts
    imply, with a 95% interval, clipped to [0, 1].

    `counts[noisy, predicted]` are the validation split's; `transition[true, noisy]` is the
    noise's T. Under class-conditional noise the expected counts are N = Tᵀ·C, with C the
    clean-label confusion counts, so C = T⁻ᵀ·N and the clean accuracy trace(C)/n is the mean over
    the n samples of the weight W[noisy, predicted] with W = T⁻¹. For symmetric noise this is
    (noisy_acc − η/(K−1)) / (1 − η − η/(K−1)), an increasing map of the noisy accuracy. The
    interval is the normal one of that mean (its standard error from the weights' spread over the
    samples): for symmetric noise, the Wald interval of the noisy accuracy through the same map.
    It covers the validation sample only, given T. A singular T gives NaN.
    """
    n = float(counts.sum())
    if n == 0 or np.linalg.cond(transition) > 1e12:
        return math.nan, math.nan, math.nan
    weights = np.linalg.inv(transition)
    p = counts / n
    mean = float((weights * p).sum())
    spread = max(float((weights**2 * p).sum()) - mean**2, 0.0)
    half = Z95 * math.sqrt(spread / n)
    return _unit(mean), _unit(mean - half), _unit(mean + half)


def _unit(value: float) -> float:
    """Clipped to [0, 1]: an unbiased estimate from a finite sample can land outside."""
    return min(max(value, 0.0), 1.0)
