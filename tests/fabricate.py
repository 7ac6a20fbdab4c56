"""Experiment folders on disk without Ray: what `search.run` and Tune leave behind.

`fabricate(root, trials)` writes `<root>/<name>/experiment.json`, built by `search.new_manifest`
so its shape is exactly the driver's, and per trial `<setting>/<trial_id>/journal.jsonl` (the
header with the sampled parameters and resolved config, then one row per epoch, as trials write
them: `journal.py`).
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
from jal_search.journal import JOURNAL
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


STARTED = 1_795_480_197.25  # every fabricated trial's start (its journal's header); epochs 1.5 s


@dataclass(frozen=True)
class FakeTrial:
    """One trial: its sampled parameters and val_acc per epoch reached."""

    trial_id: str
    params: dict[str, float]
    val_acc: list[float]
    diverged: bool = False  # the last epoch's loss was NaN: val/test/loss are NaN there
    error: str | None = None  # the trial finally failed: listed in the manifest's failures

    def rows(self, setting: str) -> list[dict[str, Any]]:
        """The journal's rows: train.py's metrics, the label hash, node and time."""
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
                    "val_acc_clean_est": math.nan if broken else clean_estimate(val),
                    "val_acc_clean_lo": math.nan if broken else clean_estimate(val) - 0.05,
                    "val_acc_clean_hi": math.nan if broken else clean_estimate(val) + 0.05,
                    "test_acc": math.nan if broken else clean_acc(val),
                    "lr": 0.05 / i,
                    "noise_realised": 0.37,
                    "epoch_seconds": 0.1,
                    "diverged": 1.0 if broken else 0.0,
                    "label_hash": f"hash-{setting}",
                    "node_id": "fab",
                    "timestamp": STARTED + 1.5 * i,
                }
            )
        return rows


def clean_estimate(val: float) -> float:
    """The fabricated val_acc_clean_est of an epoch: above val_acc, as under label noise."""
    return 0.25 + val / 2


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
    plans_by_name = {p.name: p for p in plans}
    for setting, fakes in trials.items():
        for fake in fakes:
            config = plans_by_name[setting].trial(fake.params).resolve()
            header = {
                "trial": fake.trial_id,
                "setting": setting,
                "params": fake.params,
                "config": config.model_dump(mode="json"),
                "started": STARTED,
            }
            lines = (json.dumps(e) for e in [{"header": header}, *fake.rows(setting)])
            folder = path / setting / fake.trial_id
            folder.mkdir(parents=True)
            (folder / JOURNAL).write_text("".join(f"{line}\n" for line in lines))
    return path
