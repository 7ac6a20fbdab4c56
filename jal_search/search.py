"""The search driver: one Tune experiment per noise setting, run one after another.

Settings run sequentially so each gets the whole cluster; within a setting, trials run
concurrently (`max_concurrent_trials`, resources per trial). A setting is marked done in the
manifest only when its Tune experiment has finished, so `resume` restores exactly the unfinished
ones: finished trials are never rerun, unfinished ones continue from their last checkpoint, and
the searcher's state (Optuna study, ASHA rungs) comes back with Tune's own restore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jal_search import experiment as exp
from jal_search.errors import UserError
from jal_search.spec import SearchSpec, SettingPlan, load_spec, parse_spec, plan


@dataclass(frozen=True)
class Best:
    """The best trial of one setting: highest last-epoch val_acc among non-failed, non-diverged."""

    setting: str
    trial_id: str
    params: dict[str, Any]
    val_acc: float
    test_acc: float
    epochs: int


def run(
    source: str,
    *,
    name: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    storage_path: str | None = None,
) -> Path:
    """Start a new search from a spec; refuses to overwrite an existing experiment."""
    spec = load_spec(source)
    updates = {k: v for k, v in {"name": name, "storage_path": storage_path}.items() if v}
    if updates:
        spec = parse_spec({**spec.model_dump(), **updates}, where="spec")
    path = exp.experiment_dir(spec.storage_path, spec.name)
    if (path / exp.MANIFEST).exists():
        raise UserError(
            f"experiment {spec.name!r} already exists at {path}; continue it with "
            f"`jal-search resume {path}` or start another with --name NEW"
        )
    plans = plan(spec)
    with exp.locked(path):
        manifest = {
            "name": spec.name,
            "spec_source": str(source),
            "spec": spec.model_dump(mode="json"),
            "settings": [
                {
                    "name": p.name,
                    "type": p.setting.type,
                    "rate": p.setting.rate,
                    "a_min": None if p.a_min is None or math.isinf(p.a_min) else p.a_min,
                    "amse_bound": spec.amse_bound if p.a_min is not None else None,
                    "status": "pending",
                    "failures": {},
                }
                for p in plans
            ],
            **exp.provenance(),
        }
        exp.write_json_atomic(path / exp.MANIFEST, manifest)
        print(f"experiment {spec.name}: {path}", flush=True)
        _drive(spec, plans, path, address, num_cpus)
    return path


def resume(ref: str, *, address: str | None = None, num_cpus: int | None = None) -> Path:
    """Finish an interrupted search: unfinished settings continue where they stopped."""
    path = exp.find_experiment(ref)
    manifest = exp.read_manifest(path)
    spec = parse_spec(manifest["spec"], where="experiment.json")
    with exp.locked(path):
        _drive(spec, plan(spec), path, address, num_cpus)
    return path


def _drive(
    spec: SearchSpec,
    plans: list[SettingPlan],
    path: Path,
    address: str | None,
    num_cpus: int | None,
) -> None:
    from jal_search import tune_adapter

    cluster = tune_adapter.connect(address, num_cpus)
    try:
        tune_adapter.check_resources(spec, cluster)
        done = {s["name"] for s in exp.read_manifest(path)["settings"] if s["status"] == "done"}
        for p in plans:
            if p.name in done:
                continue
            print(f"\n=== noise setting {p.name} ===", flush=True)
            exp.update_setting(path, p.name, status="running")
            results = tune_adapter.run_setting(spec, p, str(path), resume=True)
            failures = {r["trial_id"]: r["error"] for r in results if r.get("error")}
            exp.update_setting(path, p.name, status="done", failures=failures)
    finally:
        tune_adapter.disconnect(cluster)
    print(summary_table(path))


def best_trials(path: Path) -> list[Best]:
    """The best trial per finished setting, by last-epoch validation accuracy."""
    manifest = exp.read_manifest(path)
    max_epochs = manifest["spec"]["budget"]["epochs"]
    best = []
    for setting in manifest["settings"]:
        records = exp.read_trials(path, setting["name"], setting.get("failures", {}))
        done = setting["status"] == "done"
        candidates = [
            r
            for r in records
            if r.history
            and r.status(max_epochs, done) not in ("failed", "diverged")
            and math.isfinite(r.history[-1].get("val_acc", math.nan))
        ]
        if not candidates:
            continue
        top = max(candidates, key=lambda r: r.history[-1]["val_acc"])
        last = top.history[-1]
        best.append(
            Best(
                setting["name"],
                top.trial_id,
                top.config,
                last["val_acc"],
                last["test_acc"],
                int(last["training_iteration"]),
            )
        )
    return best


def summary_table(path: Path) -> str:
    rows = best_trials(path)
    if not rows:
        return "no finished trials yet"
    lines = ["best config per noise setting (selected on val_acc; test_acc reported only):"]
    lines.append(f"  {'setting':16} {'val_acc':>8} {'test_acc':>8} {'epochs':>6}  params")
    for b in rows:
        params = ", ".join(f"{k}={v:.4g}" for k, v in sorted(b.params.items()))
        lines.append(f"  {b.setting:16} {b.val_acc:8.4f} {b.test_acc:8.4f} {b.epochs:6d}  {params}")
    return "\n".join(lines)
