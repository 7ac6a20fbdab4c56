"""The search driver: every noise setting in one run, settings one after another — one Tune
experiment (`executor: ray`, `tune_adapter`) or trial threads in this process (`executor: local`,
`local_search`), over the same record.

Each setting has its own searcher and scheduler; its trials are started once the previous
setting's have all been started, so they fill the slots its last trials leave idle, and trials
run concurrently up to `max_concurrent_trials` (resources per trial). A setting is marked running
when its first trial starts and done when the whole search has finished; `resume` carries on
from the record on disk (each setting's Optuna study, each trial's journal and checkpoints):
finished trials are never rerun, unfinished ones continue from their last checkpoint, and no
trial is sampled in place of one that was already asked.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jal_search import experiment as exp
from jal_search import results
from jal_search.errors import UserError
from jal_search.spec import (
    SearchSpec,
    SettingPlan,
    load_spec,
    parse_spec,
    plan,
    trials_per_setting,
    with_trials,
)


def run(
    source: str,
    *,
    name: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    data_root: str | None = None,
    download: bool = False,
) -> Path:
    """Start a new search from a spec; refuses to overwrite an existing experiment.

    Every check (spec, data and noise files, cluster resources, storage and tracking on
    multi-node) runs before the experiment folder is created, so a refused search leaves nothing
    behind. The data check runs on this machine only when Ray is local (on a cluster the data
    lives on the workers).
    """
    spec = load_spec(source)
    updates = {"name": name, "storage_path": storage_path, "tracking_uri": tracking_uri}
    if data_root:
        updates["data_root"] = str(Path(data_root).expanduser().resolve())
    updates = {k: v for k, v in updates.items() if v}
    if updates:
        spec = parse_spec({**spec.model_dump(), **updates}, where="spec")
    path = exp.experiment_dir(spec.storage_path, spec.name)
    if (path / exp.MANIFEST).exists():
        raise UserError(
            f"experiment {spec.name!r} already exists at {path}; continue it with "
            f"`jal-search resume {path}` or start another with --name NEW"
        )
    plans = plan(spec)
    if download:
        from jal_search.data import load_dataset

        load_dataset(spec.dataset, spec.data_root, download=True)
    if address is None:
        _check_data(plans)
    with _session(spec, path, address, num_cpus) as session, exp.locked(path):
        if (path / exp.MANIFEST).exists():  # another driver created it while Ray started
            raise UserError(f"experiment {spec.name!r} was just created at {path} by another run")
        manifest = new_manifest(spec, plans, str(source))
        exp.write_json_atomic(path / exp.MANIFEST, manifest)
        print(f"experiment {spec.name}: {path}", flush=True)
        _drive(spec, plans, path, session)
    return path


def new_manifest(spec: SearchSpec, plans: list[SettingPlan], source: str) -> dict[str, Any]:
    """The manifest of a new experiment: every setting pending, no failures yet."""
    return {
        "name": spec.name,
        "spec_source": source,
        "spec": spec.model_dump(mode="json"),
        "settings": [
            {
                "name": p.name,
                "type": p.setting.type,
                "rate": p.setting.rate,
                "a_min": None if p.a_min is None or math.isinf(p.a_min) else p.a_min,
                "amse_bound": spec.amse_bound if p.a_min is not None else None,
                "status": "pending",
                "trials": trials_per_setting(spec, p.space),  # raised by `extend`
                "failures": {},
            }
            for p in plans
        ],
        **exp.provenance(),
    }


def resume(
    ref: str,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Finish an interrupted search: unfinished settings continue where they stopped."""
    path = exp.find_experiment(ref)
    manifest = exp.read_manifest(path)
    exp.refuse_older_layout(path, [s["name"] for s in manifest["settings"]])
    raw = manifest["spec"] | ({"tracking_uri": tracking_uri} if tracking_uri else {})
    spec = parse_spec(raw, where="experiment.json")
    with _session(spec, path, address, num_cpus) as session, exp.locked(path):
        _drive(spec, plan(spec), path, session)
    return path


def extend(
    ref: str,
    trials: int,
    *,
    settings: list[str] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Run `trials` more trials in each noise setting (or in those named), in the same
    experiment: each setting's searcher carries on from its study, warm with every trial so far.
    An unfinished search is finished on the way, as by `resume`."""
    if trials < 1:
        raise UserError(f"--trials: must be at least 1, got {trials}")
    path = exp.find_experiment(ref)
    manifest = exp.read_manifest(path)
    names = [s["name"] for s in manifest["settings"]]
    exp.refuse_older_layout(path, names)
    spec = parse_spec(manifest["spec"], where="experiment.json")
    unknown = sorted(set(settings or []) - set(names))
    if unknown:
        raise UserError(
            f"--setting: {unknown[0]!r} is not a setting of {path.name} ({', '.join(names)})"
        )
    if spec.searcher.type == "grid":
        raise UserError("extend: grid searches run a fixed set of configs; run a new spec instead")
    plans = {p.name: p for p in plan(spec)}
    with exp.locked(path):
        for entry in manifest["settings"]:
            if settings and entry["name"] not in settings:
                continue
            wanted = entry["trials"] + trials
            most = trials_per_setting(with_trials(spec, wanted), plans[entry["name"]].space)
            if most <= entry["trials"]:
                raise UserError(
                    f"--trials: setting {entry['name']} has run every config of its finite "
                    f"space ({entry['trials']}); widen the space in a new spec instead"
                )
            entry.update(trials=most, status="pending")
        exp.write_json_atomic(path / exp.MANIFEST, manifest)
    return resume(str(path), address=address, num_cpus=num_cpus, tracking_uri=tracking_uri)


def sync(ref: str, tracking_uri: str | None = None) -> str:
    """Bring MLflow up to date with the experiment on disk (after an outage, or anytime)."""
    from jal_search import tracking

    path = exp.find_experiment(ref)
    manifest = exp.read_manifest(path)
    uri = (
        tracking_uri or manifest["spec"].get("tracking_uri") or tracking.default_tracking_uri(path)
    )
    with exp.locked(path):
        return str(tracking.Tracker(uri, manifest["name"]).sync(path))


def evaluate(
    ref: str,
    *,
    seeds: int = 3,
    scope: str = "last",
    address: str | None = None,
    num_cpus: int | None = None,
    pack: int | None = None,
) -> str:
    """Retrain each setting's best config at full budget over `seeds` seeds; write final tables.

    Seeds are the spec's seed, seed+1, …; each seed also draws its own noisy labels (as upstream,
    which builds the data after seeding). Trainings on in-memory datasets run in packs of `pack`
    per Ray task (`packed.run_packed`; None: `packed.auto_pack_size`, 1: one per task). Returns
    the markdown table (mean ± std of test_acc).
    """
    from jal_search import tune_adapter
    from jal_search.packed import auto_pack_size, group_packs

    if seeds < 1:
        raise UserError(f"--seeds: must be at least 1, got {seeds}")
    if pack is not None and pack < 1:
        raise UserError(f"--pack: must be at least 1, got {pack}")
    path = exp.find_experiment(ref)
    ex = results.with_trials(path)
    chosen = results.best(ex, scope=scope)
    if not chosen:
        raise UserError(f"experiment {path}: no eligible trial to evaluate (all failed/diverged)")
    jobs = []
    for name, best in chosen.items():
        config = results.recorded_config(ex, name, best.trial_id)
        for seed in range(config.seed, config.seed + seeds):
            jobs.append((name, config.model_copy(update={"seed": seed, "noise_seed": seed})))
    cluster = tune_adapter.connect(address, num_cpus)
    try:
        r = ex.spec.resources
        configs = [c for _, c in jobs]
        size = pack or auto_pack_size(len(jobs), cluster.cpus // r.cpus_per_trial)
        packs = group_packs(configs, size)
        print(
            f"evaluating {len(chosen)} settings × {seeds} seeds: {len(jobs)} trainings "
            f"in {len(packs)} Ray tasks"
        )
        packed = tune_adapter.run_trainings(
            [[configs[i] for i in p] for p in packs], r.cpus_per_trial, r.gpus_per_trial
        )
    finally:
        tune_adapter.disconnect(cluster)
    outcomes: list[dict[str, Any]] = [{}] * len(jobs)
    for p, outs in zip(packs, packed, strict=True):
        for i, out in zip(p, outs, strict=True):
            outcomes[i] = out
    rows = [
        {
            "setting": name,
            "loss": config.loss,
            "seed": config.seed,
            "test_acc": out.get("test_acc"),
            "val_acc": out.get("val_acc"),
            "status": out["status"],
        }
        for (name, config), out in zip(jobs, outcomes, strict=True)
    ]
    with exp.locked(path):
        results.write_final(ex, rows)
    return results.markdown_final(ex)


def _check_data(plans: list[SettingPlan]) -> None:
    """Build each setting's data, noisy labels, model and loss once, before anything is written.

    A missing folder, a bad label file or an unknown model is then a one-line error here rather
    than every trial failing inside Ray.
    """
    from jal_search.train import check_trial

    for p in plans:
        check_trial(p.base)


@dataclass(frozen=True)
class _Session:
    tracker: Any  # tracking.Tracker
    search: Callable[..., dict[str, list[dict[str, Any]]]]  # run_search of the spec's executor
    release: Callable[[], None]  # lets Ray go sooner (it is let go at the end anyway)


@contextlib.contextmanager
def _session(
    spec: SearchSpec, path: Path, address: str | None, num_cpus: int | None
) -> Iterator[_Session]:
    """What runs a search, checked, and an MLflow tracker, for the length of the search: Ray
    connected (`executor: ray`), or this process's trial slots (`executor: local`)."""
    from jal_search import tracking

    uri = spec.tracking_uri or tracking.default_tracking_uri(path)
    if spec.executor == "local":
        from jal_search import local_search, train

        if address:
            raise UserError(
                "--address: the spec's executor is local (trials in this process); set "
                "executor: ray in the spec to run on a cluster"
            )
        slots = local_search.slots(spec, num_cpus)
        search = functools.partial(local_search.run_search, slots=slots)
        # Once, before the tracker sets MLflow up in the background: both are Python, and on
        # the GIL together they held the first trials back ~1.5 s more than in turn.
        train.import_first_optimizer()
        yield _Session(tracking.Tracker(uri, spec.name), search, lambda: None)
        return
    from jal_search import tune_adapter

    cluster = tune_adapter.connect(address, num_cpus)
    try:
        tune_adapter.check_resources(spec, cluster)
        tracking.check_multi_node(uri, cluster.nodes)
        release = functools.partial(tune_adapter.disconnect, cluster)
        yield _Session(tracking.Tracker(uri, spec.name), tune_adapter.run_search, release)
    finally:
        tune_adapter.disconnect(cluster)


def _drive(spec: SearchSpec, plans: list[SettingPlan], path: Path, session: _Session) -> None:
    tracker = session.tracker
    tracker.start(exp.read_manifest(path), background=True, path=path)
    if any(s["status"] != "done" for s in exp.read_manifest(path)["settings"]):
        started: set[str] = set()

        def on_setting_start(name: str) -> None:
            if name not in started:
                started.add(name)
                print(f"\n=== noise setting {name} ===", flush=True)
                exp.update_setting(path, name, status="running")

        counts = {s["name"]: s["trials"] for s in exp.read_manifest(path)["settings"]}
        failed = session.search(
            spec, plans, str(path), counts, tracker=tracker, on_setting_start=on_setting_start
        )
        # A private Ray's shutdown (a second or more of waiting on its processes) while the
        # tracker ends the last setting in the background (its report's plots: a second).
        session.release()
        for name, trials in failed.items():
            failures = {t["trial_id"]: t["error"] for t in trials}
            exp.update_setting(path, name, status="done", failures=failures)
        _sync_quietly(tracker, path)
    print(summary_table(path))


def _sync_quietly(tracker: Any, path: Path) -> None:
    """Sync MLflow after the search; an outage only delays it (`jal-search sync` finishes it)."""
    try:
        tracker.sync(path)
    except UserError as err:
        print(f"warning: MLflow not updated ({err}); run `jal-search sync {path}` later")


def best_trials(path: Path) -> list[results.Selection]:
    """The best trial per setting: `results.select_best` with scope `last` (its rules apply)."""
    return list(results.best(path, scope="last").values())


def summary_table(path: Path) -> str:
    rows = best_trials(path)
    if not rows:
        return "no finished trials yet"
    lines = [
        "best config per noise setting (selected on val_acc; test_acc and the clean-label "
        "estimate of val_acc reported only):",
        f"  {'setting':16} {'val_acc':>8} {'clean est [95%]':>23} {'test_acc':>8} {'epochs':>6}"
        "  params",
    ]
    for b in rows:
        params = ", ".join(f"{k}={v:.4g}" for k, v in sorted(b.params.items()))
        lines.append(
            f"  {b.setting:16} {b.val_acc:8.4f} {results.clean_text(b.clean):>23} "
            f"{b.test_acc:8.4f} {b.epochs:6d}  {params}"
        )
    return "\n".join(lines)
