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
    val_acc: float,
    test_acc: float,
    lr: float,
    noise_realised: float,
    epoch_seconds: float,
    bf16: bool,
) -> dict[str, float]:
    """One epoch's row, as every loop reports it. A non-finite loss marks the epoch diverged, and
    its accuracies NaN (the model it evaluated is no model)."""
    diverged = not math.isfinite(train_loss)
    return {
        "epoch": float(epoch),
        "train_loss": train_loss,
        "noisy_fit": noisy_fit,
        "memorized": memorized,
        "val_acc": math.nan if diverged else val_acc,
        "test_acc": math.nan if diverged else test_acc,
        "lr": lr,
        "noise_realised": noise_realised,
        "epoch_seconds": epoch_seconds,
        "diverged": float(diverged),
        "bf16": float(bf16),
    }
