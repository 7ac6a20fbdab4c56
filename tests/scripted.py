"""Scripted training, for tests of the search machinery: a trial's metrics per epoch are a fixed
function of its config and epoch, whatever runs it (`scripted_trial` with `run_trial`'s
signature, `ScriptedPack` with `packed.PackTrainer`'s), so two searches given the same metrics can
be compared decision for decision. A few milliseconds per epoch, so Tune's events interleave as
they would in a real search."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from jal_search.metrics import epoch_metrics

EPOCH_S = 0.02
SAMPLES = 1_000_000  # of the scripted evaluation


def metrics(config: Any, epoch: int) -> dict[str, float]:
    """A score that peaks at lr 0.03 and alpha 1, distinct per config, rising with the epoch."""
    alpha = config.loss_params.get("alpha", 1.0)
    score = (
        0.8 - 0.05 * (math.log10(config.lr) + 1.5) ** 2 - 0.02 * math.log10(alpha) ** 2
    ) + 0.02 * epoch
    hits = round(score * SAMPLES)
    counts = np.array([[hits, SAMPLES - hits], [0, 0]])  # [label, predicted]: accuracy = score
    return epoch_metrics(
        epoch=epoch,
        train_loss=1.0 - score,
        noisy_fit=score,
        memorized=0.0,
        val_counts=counts,
        test_counts=counts,
        transition=None,
        lr=config.lr,
        noise_realised=config.noise_rate,
        epoch_seconds=EPOCH_S,
        bf16=False,
    )


def _state(history: list[dict[str, float]]) -> dict[str, Any]:
    return {"epoch": len(history), "history": list(history), "label_hash": "scripted"}


def scripted_trial(config: Any, report: Any = None, resume: Any = None) -> None:
    history = list(resume["history"]) if resume else []
    for epoch in range(len(history) + 1, config.epochs + 1):
        time.sleep(EPOCH_S)
        history.append(metrics(config, epoch))
        if report is not None:
            report(history[-1], _state(history))


class ScriptedPack:
    def __init__(self, config: Any) -> None:
        self.members: dict[int, tuple[Any, list[dict[str, float]]]] = {}

    def add(self, config: Any, resume: Any = None) -> int:
        key = len(self.members) + max(self.members, default=0) + 1
        self.members[key] = (config, list(resume["history"]) if resume else [])
        return key

    def remove(self, key: int) -> None:
        del self.members[key]

    def train_epoch(self, keys: list[int]) -> dict[int, dict[str, float]]:
        time.sleep(EPOCH_S)
        out = {}
        for key in keys:
            config, history = self.members[key]
            history.append(metrics(config, len(history) + 1))
            out[key] = history[-1]
        return out

    def state(self, key: int) -> dict[str, Any]:
        return _state(self.members[key][1])


class FailingPack(ScriptedPack):
    """A pack in which trials with alpha above 3 cannot join (as with an unusable checkpoint)."""

    def add(self, config: Any, resume: Any = None) -> int:
        if config.loss_params.get("alpha", 1.0) > 3:
            raise ValueError(f"scripted failure of alpha {config.loss_params['alpha']:.3g}")
        return super().add(config, resume)
