"""The only module that calls Ray. Ray's API moves quickly; everything it touches is here.

- `connect` starts a private local Ray or attaches to a cluster;
- `run_search` runs (or resumes) a search's Tune experiment: every noise setting with its own
  searcher (Optuna TPE, random, grid, packs) and scheduler (ASHA on epochs), per-epoch
  checkpoints, retries from the last checkpoint;
- the trainable wraps `train.run_trial`, turning its `report(metrics, state)` hook into
  `tune.report(metrics, checkpoint=...)`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import ray
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.experiment import MEMBERS, SETTING, TrialRecord, unpack
from jal_search.spec import (
    Param,
    SearchSpec,
    SettingPlan,
    fixed_configs,
    packs,
    trials_per_setting,
)
from jal_search.train import CheckpointError, load_checkpoint, run_trial, save_checkpoint

METRIC, MODE = "val_acc", "max"
PROGRESS_METRICS = {"val_acc": "val_acc", "test_acc": "test_acc", "noisy_fit": "noisy_fit"}
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A setting stops (resumably) when less than this is free under the storage path: Tune rewrites
# its state, result and params files in place, and a disk that fills completely truncates them.
STORAGE_RESERVE = 64 << 20
RESULT_FILE = "result.json"  # Tune's per-trial results, one JSON line per report
# Tune's experiment and searcher state, and where `_BackUpState` keeps their last complete set.
STATE_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
STATE_BACKUP = ".tune-state.json"
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

    Each setting keeps its own searcher and scheduler (`_BySetting`, `_SchedulerBySetting`);
    trials are suggested setting after setting, so a setting's last trials share the cluster
    with the next setting's first ones instead of leaving slots idle, and one set of actors
    serves them all. Trial folders are `<experiment>/<setting>/<trial id>`; Tune's own state sits
    in the experiment folder. `on_setting_start(name)` is called as each of a setting's trials
    starts.

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
    counts = {p.name: _trial_count(spec, p) for p in plans}
    _restore_state(path)
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
                search_alg=_by_setting(spec, plans),
                scheduler=_SchedulerBySetting({p.name: _scheduler(spec) for p in plans}),
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
                    _StorageGuard(experiment_dir),
                    _BackUpState(),
                    _KeepResultsOnRestart(),
                    _Tracking(spec.budget.epochs),
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
    _StorageGuard(experiment_dir).check()
    _DRIVER.update(tracker=tracker, on_setting_start=on_setting_start)
    try:
        grid = tuner.fit()
    except UserError:
        raise
    except Exception:
        if _storage_full(experiment_dir, []):  # e.g. Tune cannot read an error file it left empty
            raise _no_space(experiment_dir) from None
        raise
    finally:
        _DRIVER.clear()
    if grid.errors and _storage_full(experiment_dir, grid.errors):
        raise _no_space(experiment_dir)
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


def _storage_full(experiment_dir: str, errors: list[BaseException]) -> bool:
    """Whether trials failed, or Tune broke, because the storage path is full.

    On a full disk every trial fails (its checkpoint cannot be written) and burns its retries; a
    setting ended that way must stay unfinished so that `resume` reruns those trials once there
    is space again. Full: a trial failed with ENOSPC/EDQUOT, or less than STORAGE_RESERVE is left.
    """
    causes = [getattr(e, "cause", None) or e for e in errors]
    if any(isinstance(c, OSError) and c.errno in STORAGE_ERRNOS for c in causes):
        return True
    try:
        return shutil.disk_usage(experiment_dir).free < STORAGE_RESERVE
    except OSError:  # not a local path
        return False


class _StorageGuard(tune.Callback):
    """Ends the setting with a UserError once free space under the storage path drops below
    STORAGE_RESERVE, checked at most once a second on the driver.

    The error leaves Tune's loop like a killed driver would: the state saved at the last step
    (every step, see DRIVER_ENV) is intact, and `resume` continues the unfinished trials.
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir
        self._next = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + 1.0
            self.check()

    def check(self) -> None:
        try:
            free = shutil.disk_usage(self.experiment_dir).free
        except OSError:  # not created yet, or not a local path
            return
        if free < STORAGE_RESERVE:
            raise _no_space(self.experiment_dir)


class _BackUpState(tune.Callback):
    """Keeps the last complete set of Tune's experiment and searcher state in STATE_BACKUP.

    Tune rewrites those files in place on the driver, and a background sync copies them one by
    one to the experiment folder: a kill mid-copy leaves there a truncated file (resume would
    start the whole search over) or files from two different steps (the searcher then meets
    trials it never suggested). Tune asks callbacks for their state right after writing all of
    its own, so a set taken then is complete and consistent; it is written as one file,
    atomically, and `_restore_state` puts it back before a resume.
    """

    def __init__(self) -> None:
        self._staging: str | None = None
        self._backup: Path | None = None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._staging = trial.storage.experiment_driver_staging_path
        self._backup = Path(trial.storage.experiment_fs_path, STATE_BACKUP)  # local or NFS

    def get_state(self) -> None:
        if self._staging is None or self._backup is None:
            return  # no trial yet: nothing worth restoring
        state = {
            source.name: base64.b64encode(source.read_bytes()).decode()
            for pattern in STATE_FILES
            for source in Path(self._staging).glob(pattern)
        }
        tmp = self._backup.with_name(f"{STATE_BACKUP}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._backup)


def _restore_state(experiment_dir: Path) -> None:
    """Put back Tune's state files as `_BackUpState` last saved them, all together."""
    try:
        state = json.loads((experiment_dir / STATE_BACKUP).read_text())
    except FileNotFoundError:
        return  # killed before any trial started: Tune's own files (if any) are all there is
    for name, encoded in state.items():
        tmp = experiment_dir / f".{name}.tmp"
        tmp.write_bytes(base64.b64decode(encoded))
        os.replace(tmp, experiment_dir / name)


class _KeepResultsOnRestart(tune.Callback):
    """Makes a restarting trial's result.json hold exactly the epochs up to its checkpoint.

    Tune writes results on the driver, in a staging folder that a background sync copies to the
    storage path, and a trial that restarts from a checkpoint (retried, moved off a lost node,
    resumed) gets its staging result.json replaced by the storage copy. A copy the sync had not
    refreshed lost the epochs reported since (seen on a loaded machine: epochs 1-2 of a trial
    moved at epoch 2); a fresh one kept epochs reported after the checkpoint, which the trial
    then reports again. So, just before Tune's logger restores the file (user callbacks run
    first), the storage copy becomes the staging rows up to the checkpoint's epoch.
    """

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        restored = trial.latest_checkpoint_result
        if restored is None:
            return  # a fresh start: Tune restores nothing
        local = Path(trial.local_path, RESULT_FILE)
        stored = Path(trial.storage.trial_fs_path, RESULT_FILE)  # experiments are local or NFS
        if not local.is_file() or local == stored or not stored.parent.is_dir():
            return
        epoch = restored.metrics.get("epoch", math.inf)
        kept = [line for line in local.read_text().splitlines() if _epoch(line) <= epoch]
        tmp = stored.with_name(f".{RESULT_FILE}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, stored)


def _epoch(line: str) -> float:
    """A result line's epoch; inf for a line that is not one (half-written: dropped)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _no_space(experiment_dir: str) -> UserError:
    return UserError(
        f"storage_path: no space left under {experiment_dir}; free some space, then run "
        f"`jal-search resume {experiment_dir}` (finished trials are kept)"
    )


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial failed: the trial's own exception, not Ray's wrapper.

    Tune hands back a `RayTaskError` whose text is a colored worker banner (pid, ip, actor id);
    the exception the trial raised is its `cause`.
    """
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


# What the driver's callbacks report to: the tracker, and the hook told when a setting starts.
# Tune pickles callbacks with the experiment and, on restore, brings back those copies instead
# of taking new ones; the callbacks therefore hold no driver objects and find them here.
_DRIVER: dict[str, Any] = {}


class _Tracking(tune.Callback):
    """Forwards Tune's trial events to the tracker, on the driver (trials never talk to MLflow),
    and tells the driver when a setting's first trial starts.

    The tracker never raises (an MLflow outage only leaves it behind, and `sync` catches up from
    the Tune files).
    """

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs
        self._last: dict[str, dict] = {}  # each (member) trial's last row: a member may stop early

    @property
    def tracker(self) -> Any:
        return _DRIVER.get("tracker")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        started = _DRIVER.get("on_setting_start")
        if started:
            started(trial.config[SETTING])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any):
        setting = trial.config[SETTING]
        for trial_id, params, row in unpack(trial.trial_id, trial.config, result):
            if row is not None:
                self._last[trial_id] = row
                if self.tracker:
                    self.tracker.on_result(setting, trial_id, params, row)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        setting = trial.config[SETTING]
        for trial_id, _, last in unpack(trial.trial_id, trial.config, trial.last_result or {}):
            last = self._last.pop(trial_id, None) or last  # Tune's own for a plain trial
            if self.tracker:
                record = TrialRecord(setting, trial_id, {}, [last] if last else [])
                status = record.status(self.max_epochs, True)
                self.tracker.on_trial_end(setting, trial_id, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for trial_id, _, _ in unpack(trial.trial_id, trial.config):
            self._last.pop(trial_id, None)
            if self.tracker:
                self.tracker.on_trial_end(trial.config[SETTING], trial_id, "failed")


class _BySetting(Searcher):
    """One searcher per noise setting behind Tune's single one.

    Trials are suggested setting after setting (the next setting's first once the previous one
    has suggested all of its `counts`), each config tagged with its SETTING; results go back to
    the searcher that suggested the trial.
    """

    def __init__(self, searchers: dict[str, Searcher], counts: dict[str, int]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self._searchers = searchers
        self._left = dict(counts)
        self._setting_of: dict[str, str] = {}
        # Each setting's searcher state as last saved (base64). Tune saves after every step;
        # only the settings whose searcher changed since are saved again.
        self._saved: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec):
        return True  # each setting's searcher was built with its own space, metric and mode

    def suggest(self, trial_id: str) -> dict | str | None:
        name = next((n for n, left in self._left.items() if left > 0), None)
        if name is None:
            return Searcher.FINISHED
        config = self._searchers[name].suggest(trial_id)
        self._saved.pop(name, None)
        if not isinstance(config, dict):
            return config  # the setting's searcher has nothing now (None) or is finished
        self._left[name] -= 1
        self._setting_of[trial_id] = name
        return {**config, SETTING: name}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        name = self._setting_of[trial_id]
        self._searchers[name].on_trial_result(trial_id, result)
        self._saved.pop(name, None)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        name = self._setting_of[trial_id]
        self._searchers[name].on_trial_complete(trial_id, result, error)
        self._saved.pop(name, None)

    def save(self, checkpoint_path: str) -> None:
        """One JSON file: the suggestion bookkeeping and each setting's own saved state."""
        with tempfile.TemporaryDirectory(prefix="jal-searcher-") as directory:
            for name, searcher in self._searchers.items():
                if name not in self._saved:
                    searcher.save(os.path.join(directory, "state"))
                    raw = Path(directory, "state").read_bytes()
                    self._saved[name] = base64.b64encode(raw).decode()
        state = {"left": self._left, "setting_of": self._setting_of, "searchers": self._saved}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self._left, self._setting_of = state["left"], state["setting_of"]
        self._saved = state["searchers"]
        with tempfile.TemporaryDirectory(prefix="jal-searcher-") as directory:
            for name, searcher in self._searchers.items():
                Path(directory, "state").write_bytes(base64.b64decode(self._saved[name]))
                searcher.restore(os.path.join(directory, "state"))


def _by_setting(spec: SearchSpec, plans: Sequence[SettingPlan]) -> _BySetting:
    """The search's searcher: each setting's own (`_searcher`), `_trial_count` trials each."""
    return _BySetting(
        {p.name: _searcher(spec, p) for p in plans}, {p.name: _trial_count(spec, p) for p in plans}
    )


class _Listed(Searcher):
    """Configs chosen up front (a grid, seeded random samples, packs), in order."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self._configs = list(configs)

    def suggest(self, trial_id: str) -> dict | str | None:
        return self._configs.pop(0) if self._configs else Searcher.FINISHED

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self._configs))

    def restore(self, checkpoint_path: str) -> None:
        self._configs = json.loads(Path(checkpoint_path).read_text())

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Configs chosen up front learn nothing from results."""


class _SchedulerBySetting(FIFOScheduler):
    """One scheduler per noise setting (ASHA's rungs compare trials of one setting only);
    Tune's choice of the next trial to run is FIFO's, whatever the setting."""

    def __init__(self, schedulers: dict[str, TrialScheduler]) -> None:
        super().__init__()
        self._schedulers = schedulers

    def _of(self, trial: Trial) -> TrialScheduler:
        return self._schedulers[trial.config[SETTING]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        for scheduler in self._schedulers.values():
            scheduler.set_search_properties(metric, mode, **spec)
        return True

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        _nest_under_setting(trial)
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{n}: {s.debug_string()}" for n, s in self._schedulers.items())


def _nest_under_setting(trial: Trial) -> None:
    """Put the trial's folder at `<experiment>/<setting>/<trial id>`.

    Tune refuses a '/' in a `trial_dirname_creator` name, but keeps a relative folder already set
    when it first makes the folder (`Trial.init_local_path`, at the trial's start); Tune calls the
    scheduler's `on_trial_add` before that, for new and restored trials alike.
    """
    if not trial.relative_logdir:
        trial.relative_logdir = f"{trial.config[SETTING]}/{trial.trial_id}"
        trial.storage.trial_dir_name = trial.relative_logdir
        trial.invalidate_json_state()


def _unfinished(experiment_dir: str, trials: int) -> bool:
    """Whether Tune's saved state still has trials to run (or to create).

    After Ctrl-C, `fit` saves the state and returns normally, and the trials it stopped look
    finished in the returned grid; only the saved state tells them apart (PENDING: to resume).
    """
    saved = tune.ExperimentAnalysis(experiment_dir).trials
    done = (Trial.TERMINATED, Trial.ERROR)
    return len(saved) < trials or any(t.status not in done for t in saved)


def _trial_count(spec: SearchSpec, plan: SettingPlan) -> int:
    """How many trials the setting's Tune experiment makes (a grid: the size of `_param_space`)."""
    return len(packs(spec, plan)) if spec.pack > 1 else trials_per_setting(spec, plan.space)


def _distribution(p: Param) -> Any:
    if p.loguniform is not None:
        return tune.loguniform(*p.loguniform)
    if p.uniform is not None:
        return tune.uniform(*p.uniform)
    return tune.choice(p.choice)


class JalOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended, and never trains a config twice.

    Ray's OptunaSearch reports a trial stopped early by ASHA as COMPLETE with its early score, so
    TPE would treat an epoch-2 accuracy like a finished one. Here such a trial is PRUNED (Optuna
    then ranks it by its last intermediate value, below finished trials), and a diverged trial
    is FAIL, so neither steers the sampler like a finished result.

    On a finite space (every parameter a `choice`) TPE keeps proposing the configs that did well,
    and each repeat clears every ASHA rung again: benchmarks/asha_efficiency.py measured 0.255 of
    the grid's epochs with repeats, 0.132 without. A repeated draw is told its twin's outcome (so
    TPE learns nothing false) and TPE draws again; after `REDRAWS` repeats a seeded random untried
    config runs. `_trial_count` caps such a search at the space's size, so one is always left.
    """

    REDRAWS = 20

    def __init__(self, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_epochs = max_epochs

    def suggest(self, trial_id: str) -> dict | None:
        choices = self._finite_choices()
        if choices is None:  # a range: draws never repeat
            return super().suggest(trial_id)
        for _ in range(self.REDRAWS):
            config = super().suggest(trial_id)
            twin = self._twin(self._ot_trials[trial_id])
            if twin is None:
                return config
            self._tell_like(self._ot_trials.pop(trial_id), twin)
        untried = self._untried(choices)
        if untried:
            rng = random.Random(f"{self._seed}-{len(self._ot_study.trials)}")
            self._ot_study.enqueue_trial(rng.choice(untried))
        return super().suggest(trial_id)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if result and not error:
            if result.get("diverged", 0.0) >= 1.0:
                result, error = None, True
            elif result.get("training_iteration", 0) < self._max_epochs:
                result = None  # no value and no error: Optuna records PRUNED
        super().on_trial_complete(trial_id, result, error)

    def _finite_choices(self) -> dict[str, list] | None:
        if not isinstance(self._space, dict) or not all(
            isinstance(d, CategoricalDistribution) for d in self._space.values()
        ):
            return None
        return {k: list(d.choices) for k, d in self._space.items()}

    def _twin(self, drawn: Any) -> FrozenTrial | None:
        """An earlier trial (running or ended) with the same config as the `drawn` one."""
        return next(
            (
                t
                for t in self._ot_study.get_trials(deepcopy=False)
                if t.number != drawn.number and t.params and t.params == drawn.params
            ),
            None,
        )

    def _tell_like(self, drawn: Any, twin: FrozenTrial) -> None:
        for step, value in twin.intermediate_values.items():
            drawn.report(value, step)
        if twin.state == TrialState.COMPLETE:
            self._ot_study.tell(drawn, twin.value)
        else:  # a twin still running counts as pruned at its latest epoch
            failed = twin.state == TrialState.FAIL
            self._ot_study.tell(drawn, state=TrialState.FAIL if failed else TrialState.PRUNED)

    def _untried(self, choices: dict[str, list]) -> list[dict[str, Any]]:
        tried = {tuple(sorted(t.params.items())) for t in self._ot_study.get_trials(deepcopy=False)}
        configs = (dict(zip(choices, values, strict=True)) for values in product(*choices.values()))
        return [c for c in configs if tuple(sorted(c.items())) not in tried]


def _searcher(spec: SearchSpec, plan: SettingPlan) -> Searcher:
    """One setting's searcher: TPE over its space, or the configs chosen up front."""
    if spec.pack > 1:
        return _Listed([{MEMBERS: p} for p in packs(spec, plan)])
    if spec.searcher.type == "optuna" and plan.space:
        return JalOptunaSearch(
            spec.budget.epochs,
            space=OptunaSearch.convert_search_space(
                {k: _distribution(p) for k, p in plan.space.items()}
            ),
            metric=METRIC,
            mode=MODE,
            points_to_evaluate=plan.points_to_evaluate or None,
            seed=spec.searcher.seed,
        )
    return _Listed(fixed_configs(spec, plan)[: _trial_count(spec, plan)])


def _scheduler(spec: SearchSpec) -> Any:
    if spec.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.budget.epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def _trainable(params: dict[str, Any], plans: dict[str, SettingPlan]) -> None:
    """One Tune trial: the sampled point of the space applied to its setting's base config."""
    resume = _last_checkpoint()
    plan = plans[params[SETTING]]

    def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
        _report({**metrics, "label_hash": state["label_hash"]}, state)

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
        _report(result, state)

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


def _report(result: dict[str, Any], state: dict[str, Any]) -> None:
    """tune.report with the epoch's checkpoint and the node it ran on (for cluster debugging)."""
    node = ray.get_runtime_context().get_node_id()
    with tempfile.TemporaryDirectory(prefix="jal-ckpt-") as directory:
        save_checkpoint(state, directory)
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
