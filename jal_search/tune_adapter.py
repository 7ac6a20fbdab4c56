"""The Ray adapter's entry points. Ray's API moves quickly: this module and the `tune_*` ones it
uses (`tune_search`: searchers and schedulers; `tune_callbacks`: the driver's side of a search)
are the only ones that import Ray.

- `connect` starts a private local Ray or attaches to a cluster;
- `run_search` runs (or resumes) a search's Tune experiment: every noise setting with its own
  searcher (Optuna TPE, random, grid, packs) and scheduler (ASHA on epochs), per-epoch
  checkpoints, retries from the last checkpoint;
- the trainable wraps `train.run_trial`, turning its `report(metrics, state)` hook into
  `tune.report(metrics, checkpoint=...)`;
- `run_trainings` trains final configs to the end as plain Ray tasks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial

from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.experiment import MEMBERS, SETTING, TRIAL_CONFIG
from jal_search.spec import SearchSpec, SettingPlan
from jal_search.train import CheckpointError, load_checkpoint, run_trial, save_checkpoint
from jal_search.tune_callbacks import (
    DRIVER,
    BackUpState,
    ForgetLostCheckpoints,
    KeepResultsOnRestart,
    StorageGuard,
    Tracking,
    no_space,
    restore_state,
    storage_full,
)
from jal_search.tune_search import METRIC, MODE, by_setting, scheduler_by_setting, trial_count

PROGRESS_METRICS = {"val_acc": "val_acc", "test_acc": "test_acc", "noisy_fit": "noisy_fit"}
TUNER_FILE = "tuner.pkl"  # where Tune writes it is where its experiment is
CHECKPOINTS_KEPT = 2  # the latest, plus one to fall back to if the latest is damaged
# Trials must not chdir into their trial folder: data and spec paths stay as given.
NO_CHDIR = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
# glibc malloc would hand every activation buffer above 128 KiB back to the OS when freed and
# page-fault it in again at the next step; these keep them (measured on the embedded default:
# an epoch 8% faster one trial per process; packs of 8 1.24× → 1.47× the trials per CPU-hour).
# Set in the workers' environment at spawn: glibc reads it only at process start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
TRIAL_ENV = {**NO_CHDIR, **MALLOC_ENV}
DRIVER_ENV = {
    **NO_CHDIR,
    # Snapshot the experiment state on every controller step, not every ~10 s: a driver killed
    # between snapshots forgets the trials it started or finished since the last one, and resume
    # would sample (and run) replacements. A snapshot of a few dozen trials costs milliseconds.
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
    # The classic reporter takes the columns we choose (the new one prints every metric).
    "RAY_AIR_NEW_OUTPUT": "0",
    # Checkpointing every epoch is deliberate (nothing is lost); Tune's warning about it is noise.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
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
    tracker: Any = None,
    on_setting_start: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run, or resume, every noise setting of a search as one Tune experiment.

    Each setting keeps its own searcher and scheduler (`tune_search`); trials are suggested
    setting after setting, so a setting's last trials share the cluster with the next setting's
    first ones instead of leaving slots idle, and one set of actors serves them all. Trial
    folders are `<experiment>/<setting>/<trial id>`; Tune's own state sits in the experiment
    folder. `on_setting_start(name)` is called as each of a setting's trials starts.

    Returns, per setting, one entry per Tune trial: its id, its final error (None unless it
    finally failed) and its last reported metrics. Raises KeyboardInterrupt when Tune stopped
    early on Ctrl-C (it saves its state and returns normally), so the caller never mistakes a
    stopped search for a finished one; calling it again resumes.
    """
    trainable = tune.with_resources(
        tune.with_parameters(
            _packed_trainable if spec.pack > 1 else _trainable, plans={p.name: p for p in plans}
        ),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial},
    )
    path = Path(experiment_dir)  # experiments are local or NFS paths
    counts = {p.name: trial_count(spec, p) for p in plans}
    restore_state(path)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=by_setting(spec, plans),
                scheduler=scheduler_by_setting(spec, plans),
                num_samples=sum(counts.values()),
                max_concurrent_trials=spec.max_concurrent_trials,
                reuse_actors=True,
                trial_name_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=path.name,
                storage_path=str(path.parent),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                callbacks=[
                    StorageGuard(experiment_dir),
                    BackUpState(),
                    KeepResultsOnRestart(),
                    ForgetLostCheckpoints(),
                    Tracking(spec.budget.epochs),
                ],
                progress_reporter=tune.CLIReporter(
                    parameter_columns=[SETTING] + ([] if spec.pack > 1 else list(plans[0].space)),
                    metric_columns={"training_iteration": "epochs", **PROGRESS_METRICS},
                    max_report_frequency=30,
                    sort_by_metric=True,  # by TuneConfig's metric and mode
                ),
                verbose=1,
            ),
        )
    StorageGuard(experiment_dir).check()
    DRIVER.update(tracker=tracker, on_setting_start=on_setting_start, experiment_dir=path)
    try:
        grid = tuner.fit()
    except UserError:
        raise
    except Exception:
        if storage_full(experiment_dir, []):  # e.g. Tune cannot read an error file it left empty
            raise no_space(experiment_dir) from None
        raise
    finally:
        DRIVER.clear()
    if grid.errors and storage_full(experiment_dir, grid.errors):
        raise no_space(experiment_dir)
    if _unfinished(str(path), sum(counts.values())):
        raise KeyboardInterrupt("the search stopped before its trials finished")
    outcomes: dict[str, list[dict[str, Any]]] = {name: [] for name in counts}
    for r in grid:
        trial_dir = Path(r.path)  # <experiment>/<setting>/<trial id>
        outcomes[trial_dir.parent.name].append(
            {
                "trial_id": trial_dir.name,
                "error": failure_reason(r.error) if r.error else None,
                "last": r.metrics or {},
            }
        )
    return outcomes


def refuse_older_layout(experiment_dir: Path, settings: Sequence[str]) -> None:
    """Refuse, before Ray starts, an experiment whose Tune state sits in its settings' folders:
    older versions ran one Tune experiment per noise setting, which this one cannot resume."""
    if any((experiment_dir / name / TUNER_FILE).is_file() for name in settings):
        raise UserError(
            f"{experiment_dir}: made by an older jal-search (one Tune experiment per noise "
            "setting), which this version cannot resume; finish it with that version, or run "
            "the spec again under a new --name"
        )


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial failed: the trial's own exception, not Ray's wrapper.

    Tune hands back a `RayTaskError` whose text is a colored worker banner (pid, ip, actor id);
    the exception the trial raised is its `cause`.
    """
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def _unfinished(experiment_dir: str, trials: int) -> bool:
    """Whether Tune's saved state still has trials to run (or to create).

    After Ctrl-C, `fit` saves the state and returns normally, and the trials it stopped look
    finished in the returned grid; only the saved state tells them apart (PENDING: to resume).
    """
    saved = tune.ExperimentAnalysis(experiment_dir).trials
    done = (Trial.TERMINATED, Trial.ERROR)
    return len(saved) < trials or any(t.status not in done for t in saved)


def _trainable(params: dict[str, Any], plans: dict[str, SettingPlan]) -> None:
    """One Tune trial: the sampled point of the space applied to its setting's base config."""
    resume = _last_checkpoint()
    plan = plans[params[SETTING]]

    def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
        _report({**metrics, "label_hash": state["label_hash"]}, state, params)

    sampled = {k: v for k, v in params.items() if k != SETTING}
    run_trial(plan.trial(sampled), report=report, resume=resume)


def _packed_trainable(params: dict[str, Any], plans: dict[str, SettingPlan]) -> None:
    """One Tune trial that trains a pack of sampled points (`packed.run_packed`).

    Each epoch reports the members that trained under MEMBERS, and the pack's best val_acc as the
    trial's own (for the progress table only: packs run under no scheduler or searcher).
    """
    from jal_search.packed import run_packed

    resume = _last_checkpoint()
    plan = plans[params[SETTING]]

    def report(metrics: dict[int, dict[str, float]], state: dict[str, Any]) -> None:
        hashes = state["label_hashes"]
        members = {str(i): {**m, "label_hash": hashes[i]} for i, m in metrics.items()}
        scores = [m["val_acc"] for m in metrics.values() if math.isfinite(m["val_acc"])]
        result = {
            METRIC: max(scores, default=math.nan),
            "epoch": state["epoch"],
            "members_training": len(state["active"]),
            MEMBERS: members,
        }
        _report(result, state, params)

    run_packed([plan.trial(p) for p in params[MEMBERS]], report=report, resume=resume)


def _last_checkpoint() -> dict[str, Any] | None:
    """The trial's latest checkpoint state; None for a new trial or an unreadable checkpoint."""
    # One "checkpoint created" INFO line per epoch per trial would drown the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        try:
            return load_checkpoint(directory)
        except CheckpointError as err:  # a damaged checkpoint costs progress, not the trial
            warnings.warn(f"{err}; restarting the trial from epoch 0", stacklevel=1)
            return None


def _report(result: dict[str, Any], state: dict[str, Any], params: dict[str, Any]) -> None:
    """tune.report with the epoch's checkpoint and the node it ran on (for cluster debugging).

    The checkpoint also holds the trial's config (`params`): a kill while Tune copies the trial's
    files can empty params.json and result.json, and `experiment.read_trials` then reads both
    from the checkpoint.
    """
    node = ray.get_runtime_context().get_node_id()
    with tempfile.TemporaryDirectory(prefix="jal-ckpt-") as directory:
        save_checkpoint({**state, TRIAL_CONFIG: params}, directory)
        tune.report(
            {**result, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(directory)
        )


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
