"""Experiment folders on disk without Ray: what `search.run` and Tune leave behind.

`fabricate(root, trials)` writes `<root>/<name>/experiment.json`, built by `search.new_manifest`
so its shape is exactly the driver's, and per trial `<setting>/<trial_id>/params.json` and
`result.json` (one JSON line per epoch with Tune's bookkeeping keys, as Tune writes them).
Every metric is a simple function of the given val_acc curve, so a test can compute each value
it expects itself (`FakeTrial.rows`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jal_search import experiment as exp
from jal_search import search
from jal_search.spec import parse_spec, plan

SPEC: dict[str, Any] = {  # the shipped smoke spec's shape: digits, JAL-CE, two noise settings
    "name": "fab",
    "dataset": "digits",
    "loss": "jal_ce",
    "noise": {"symmetric": [0.4], "asymmetric": [0.2]},
    "space": {
        "alpha": {"loguniform": [0.3, 100]},
        "beta": {"loguniform": [0.03, 10]},
        "a": {"loguniform": [2, 60]},
    },
    "budget": {"trials": 6, "epochs": 4},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "max_concurrent_trials": 2,
}


@dataclass(frozen=True)
class FakeTrial:
    """One trial: its sampled parameters and val_acc per epoch reached."""

    trial_id: str
    params: dict[str, float]
    val_acc: list[float]
    diverged: bool = False  # the last epoch's loss was NaN: val/test/loss are NaN there
    error: str | None = None  # the trial finally failed: listed in the manifest's failures

    def rows(self, setting: str) -> list[dict[str, Any]]:
        """The result.json lines: train.py's metrics plus Tune's keys (config included)."""
        rows = []
        for i, val in enumerate(self.val_acc, start=1):
            broken = self.diverged and i == len(self.val_acc)
            rows.append(
                {
                    "epoch": float(i),
                    "train_loss": math.nan if broken else 2.0 / i,
                    "noisy_fit": 0.3 + 0.1 * i,
                    "memorized": 0.02 * i,
                    "val_acc": math.nan if broken else val,
                    "test_acc": math.nan if broken else clean_acc(val),
                    "lr": 0.05 / i,
                    "noise_realised": 0.37,
                    "epoch_seconds": 0.1,
                    "diverged": 1.0 if broken else 0.0,
                    "label_hash": f"hash-{setting}",
                    "timestamp": 1_795_480_198 + i,
                    "checkpoint_dir_name": f"checkpoint_{i - 1:06d}",
                    "should_checkpoint": True,
                    "done": i == len(self.val_acc),
                    "training_iteration": i,
                    "trial_id": self.trial_id,
                    "date": "2026-11-24_00-29-58",
                    "time_this_iter_s": 0.25,
                    "time_total_s": 0.25 * i,
                    "pid": 1234,
                    "hostname": "fab",
                    "node_ip": "127.0.0.1",
                    "config": self.params,
                    "time_since_restore": 0.25 * i,
                    "iterations_since_restore": i,
                }
            )
        return rows


def clean_acc(val: float) -> float:
    """The fabricated clean test accuracy of an epoch: differs from val_acc on purpose."""
    return 0.5 + val / 2


def fabricate(
    root: Path,
    trials: dict[str, list[FakeTrial]],
    *,
    spec: dict[str, Any] | None = None,
    status: str = "done",
) -> Path:
    """Write an experiment under `root` from `trials` (setting name → its trials); `spec`
    updates SPEC. Settings given get `status`, the others stay pending (no folder yet).
    Returns the experiment folder."""
    parsed = parse_spec({**SPEC, "storage_path": str(root), **(spec or {})})
    plans = plan(parsed)
    unknown = set(trials) - {p.name for p in plans}
    if unknown:
        raise ValueError(f"fabricate: settings {unknown} are not in the spec")
    manifest = search.new_manifest(parsed, plans, "fabricated")
    for entry in manifest["settings"]:
        entry["status"] = status if entry["name"] in trials else "pending"
        entry["failures"] = {t.trial_id: t.error for t in trials.get(entry["name"], []) if t.error}
    path = exp.experiment_dir(str(root), parsed.name)
    path.mkdir(parents=True)
    exp.write_json_atomic(path / exp.MANIFEST, manifest)
    for setting, fakes in trials.items():
        for fake in fakes:
            folder = path / setting / fake.trial_id
            folder.mkdir(parents=True)
            (folder / "params.json").write_text(json.dumps(fake.params))
            lines = (json.dumps(row) for row in fake.rows(setting))
            (folder / "result.json").write_text("".join(f"{line}\n" for line in lines))
    return path
