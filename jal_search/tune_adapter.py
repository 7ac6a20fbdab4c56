"""The Ray adapter's entry points. Ray's API moves quickly: this module and the `tune_*` ones it
uses (`tune_search`: searchers and schedulers; `tune_callbacks`: the driver's side of a search)
are the only ones that import Ray.

- `connect` starts a private local Ray or attaches to a cluster;
- `run_search` runs (or carries on with) a search as one Tune experiment: every noise setting
  with its own searcher (an Optuna study on disk: TPE, random, grid, packs) and scheduler (ASHA
  on epochs), retries of failed trials;
- the trainable wraps `train.run_trial`, turning its `report(metrics, state)` hook into a
  journal row, a checkpoint in the trial's own folder (`journal.py`), then `tune.report(row)`;
  with `pack: K`, trials run in the slots of shared pack workers instead (`tune_packs`).
  Tune places, starts, stops and restarts trials; it is not the record of what happened.
- `run_trainings` trains final configs to the end as plain Ray tasks.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial

from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.experiment import SETTING, TRIAL, no_space, storage_full
from jal_search.metrics import METRICS
from jal_search.recorded import failure_reason, train_recorded
from jal_search.spec import SearchSpec, SettingPlan
from jal_search.train import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD, run_trial
from jal_search.tune_callbacks import StorageGuard, Tracking
from jal_search.tune_packs import CLIENT_RESOURCES, member_trainable, start_workers
from jal_search.tune_search import METRIC, MODE, by_setting, scheduler_by_setting

PROGRESS_METRICS = {m.name: m.name for m in METRICS if m.progress}
TUNE_DIR = "tune"  # Tune's experiment folder inside ours
# Trials must not chdir into their trial folder: data and spec paths stay as given.
NO_CHDIR = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
# train.py's malloc thresholds, in the workers' environment at spawn: glibc reads it at start-up.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD),
}
TRIAL_ENV = {**NO_CHDIR, **MALLOC_ENV}
DRIVER_ENV = {
    **NO_CHDIR,
    # The record is the trials' journals and the settings' studies; nothing reads Tune's files
    # back (a resume builds a new experiment). So no per-trial result/params/progress files (a
    # write per result), and Tune's experiment state, which holds every trial ever started and
    # would be rewritten every 10 s or more, only once the search ends.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_GLOBAL_CHECKPOINT_S": str(24 * 3600),
    # The classic reporter takes the columns we choose (the new one prints every metric).
    "RAY_AIR_NEW_OUTPUT": "0",
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    cpus: float
    gpus: float
    started_here: bool  # True when this process started a private local Ray


def connect(address: str | None = None, num_cpus: int | None = None) -> Cluster:
    """Attach to `address` (`auto`, `ray://…`, host:port) or start a private local Ray.

    A private Ray (`address="local"`) never attaches to a stale cluster left by a killed run, and
    every port it opens (GCS, raylet, workers, agents) listens on 127.0.0.1 only.
    """
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": TRIAL_ENV}, "log_to_driver": True}
        if address:
            with _keep_loopback(address):
                ray.init(address=address, **kwargs)
        else:
            with _keep_loopback("127.0.0.1"):
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    **kwargs,
                )
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return Cluster(nodes, resources.get("CPU", 0.0), resources.get("GPU", 0.0), started)


@contextlib.contextmanager
def _keep_loopback(address: str) -> Iterator[None]:
    """Connect to, or start a node on, a loopback address as given.

    Ray rewrites 127.0.0.1/localhost to the machine's external IP: a connection then hangs (a
    cluster started with `--node-ip-address 127.0.0.1` does not listen there), and a private Ray
    started with `_node_ip_address="127.0.0.1"` would bind its gRPC servers to every interface.
    Ray skips that rewrite when its multi-node switch is off; we turn it off for this call only.
    """
    host = address.rsplit(":", 1)[0].removeprefix("ray://")
    if host not in ("127.0.0.1", "localhost", "::1"):
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def disconnect(cluster: Cluster) -> None:
    if cluster.started_here and ray.is_initialized():
        # Tune leaves Ray handles in reference cycles: freed by a collection after the shutdown
        # (in whatever thread), they would call into Ray's stopped core worker, which then ends
        # the process.
        gc.collect()
        ray.shutdown()


def check_resources(spec: SearchSpec, cluster: Cluster) -> None:
    """Refuse trials larger than the cluster, and local storage on a multi-node cluster."""
    r = spec.resources
    if r.cpus_per_trial > cluster.cpus:
        raise UserError(
            f"resources.cpus_per_trial: {r.cpus_per_trial:g} exceeds the cluster's "
            f"{cluster.cpus:g} CPUs; lower it"
        )
    if r.gpus_per_trial > cluster.gpus:
        raise UserError(
            f"resources.gpus_per_trial: {r.gpus_per_trial:g} but the cluster has "
            f"{cluster.gpus:g} GPUs; set it to 0 or run on a GPU cluster"
        )
    if cluster.nodes > 1 and "://" not in spec.storage_path and not spec.storage_shared:
        raise UserError(
            f"storage_path: {spec.storage_path!r} is local but the cluster has {cluster.nodes} "
            "nodes, so checkpoints written on one node are invisible to the others; use an NFS "
            "path that every node mounts, with storage_shared: true"
        )


def run_search(
    spec: SearchSpec,
    plans: Sequence[SettingPlan],
    experiment_dir: str,
    counts: dict[str, int],
    tracker: Any = None,
    on_setting_start: Callable[[str], None] | None = None,
    train: Callable[..., Any] = run_trial,
    pack_trainer: Callable[[TrialConfig], Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run, or carry on with, every noise setting of a search as one Tune experiment.

    Each setting keeps its own searcher (its Optuna study on disk, `tune_search`), running
    `counts[name]` trials in all, and its own scheduler; trials are suggested setting after
    setting, so a setting's last trials share the cluster with the next setting's first ones
    instead of leaving slots idle, and one set of actors serves them all. Every call builds a new
    Tune experiment in `<experiment>/tune`: what happened before is in the studies and the
    trials' journals, which a new run, a resume and `extend` carry on from (unfinished trials
    first, from their checkpoints). `on_setting_start(name)` is called as each of a setting's
    trials starts. `train` (`run_trial`'s signature) trains a trial, `pack_trainer(config)`
    (None: `packed.PackTrainer`) a pack worker's members: the tests give scripted ones.

    Returns, per setting, one entry per trial that finally failed in this run: its name and why.
    Raises KeyboardInterrupt when trials are left unfinished (Tune stopped early on Ctrl-C: it
    returns normally), so the caller never mistakes a stopped search for a finished one; calling
    it again carries on.
    """
    path = Path(experiment_dir)  # experiments are local or NFS paths
    workers: list[Any] = []
    concurrent = spec.max_concurrent_trials
    if spec.pack > 1:
        workers = start_workers(spec, plans, str(path), _pack_workers(spec, counts), pack_trainer)
        concurrent = min(len(workers) * spec.pack, spec.max_concurrent_trials or math.inf)
        trainable = tune.with_resources(
            tune.with_parameters(member_trainable, workers=workers, epochs=spec.budget.epochs),
            CLIENT_RESOURCES,
        )
    else:
        trainable = tune.with_resources(
            tune.with_parameters(
                _trainable, plans={p.name: p for p in plans}, experiment_dir=str(path), train=train
            ),
            {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial},
        )
    searcher = by_setting(spec, plans, path, counts)
    shutil.rmtree(path / TUNE_DIR, ignore_errors=True)  # the last run's: nothing is read from it
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler_by_setting(spec, searcher),
            num_samples=-1,  # until the searcher has handed out every setting's trials
            max_concurrent_trials=concurrent,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(path),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[
                StorageGuard(experiment_dir),
                Tracking(spec.budget.epochs, tracker, on_setting_start, searcher),
            ],
            progress_reporter=tune.CLIReporter(
                parameter_columns=[SETTING, TRIAL, *plans[0].space],
                metric_columns={"epoch": "epochs", **PROGRESS_METRICS},
                max_report_frequency=30,
                sort_by_metric=True,  # by TuneConfig's metric and mode
            ),
            verbose=1,
        ),
    )
    StorageGuard(experiment_dir).check()
    # Tune's result grid looks for the per-trial files it was told not to write: one warning each.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        grid = tuner.fit()
    except UserError:
        raise
    except Exception:
        if storage_full(experiment_dir, []):  # e.g. Tune cannot write its own files
            raise no_space(experiment_dir) from None
        raise
    finally:
        for worker in workers:
            ray.kill(worker)
    if grid.errors and storage_full(experiment_dir, grid.errors):
        raise no_space(experiment_dir)
    failures: dict[str, list[dict[str, Any]]] = {p.name: [] for p in plans}
    failed = 0
    for r in grid:
        if r.error is not None:
            failed += 1
            failures[r.config[SETTING]].append(
                {"trial_id": r.config[TRIAL], "error": failure_reason(r.error)}
            )
    if searcher.unfinished() > failed:
        raise KeyboardInterrupt("the search stopped before its trials finished")
    return failures


def _pack_workers(spec: SearchSpec, counts: dict[str, int]) -> int:
    """How many pack workers: as many as the cluster holds at `resources:` each, no more than
    the trials (or `max_concurrent_trials`) fill."""
    cluster, r = ray.cluster_resources(), spec.resources
    fits = cluster.get("CPU", 0.0) // r.cpus_per_trial
    if r.gpus_per_trial:
        fits = min(fits, cluster.get("GPU", 0.0) // r.gpus_per_trial)
    wanted = math.ceil(
        min(sum(counts.values()), spec.max_concurrent_trials or math.inf) / spec.pack
    )
    return max(1, min(int(fits), wanted))


def _trial_name(trial: Trial) -> str:
    """Tune's name for a trial: its setting and the searcher's name for it."""
    return f"{trial.config[SETTING]}-{trial.config[TRIAL]}"


def _trainable(
    params: dict[str, Any],
    plans: dict[str, SettingPlan],
    experiment_dir: str,
    train: Callable[..., Any],
) -> None:
    """One Tune trial: the sampled point of the space applied to its setting's base config,
    recorded in the trial's own folder and resumed from there after any restart."""
    folder = Path(experiment_dir, params[SETTING], params[TRIAL])
    origin = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    train_recorded(params, plans[params[SETTING]], folder, train, tune.report, origin)


def run_trainings(
    packs: Sequence[Sequence[TrialConfig]], cpus: float, gpus: float
) -> list[list[dict[str, Any]]]:
    """Train each pack of configs to its full budget as one Ray task, in parallel across the
    cluster (a pack of one is a plain `run_trial`; see `packed.group_packs` for what may share).

    Returns per pack, per config, its status and last-epoch metrics. A task lost with its node is
    retried (from scratch: these are short final runs without a scheduler to resume them).
    """
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(_train_to_the_end)
    return ray.get([task.remote(list(p)) for p in packs])


def _train_to_the_end(configs: list[TrialConfig]) -> list[dict[str, Any]]:
    from jal_search.packed import run_packed

    results = [run_trial(configs[0])] if len(configs) == 1 else run_packed(configs)
    return [{"status": r.status, **(r.history[-1] if r.history else {})} for r in results]
