"""What Tune tells the driver as a search runs, and what the driver keeps from it.

Part of the Ray adapter (`tune_adapter` and the `tune_*` modules, the only ones that import Ray).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import zipfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.execution.tune_controller import TuneController
from ray.tune.search import Searcher, SearchGenerator

from jal_search.errors import UserError
from jal_search.experiment import MANIFEST, SETTING, TrialRecord, unpack

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A setting stops (resumably) when less than this is free under the storage path: Tune rewrites
# its state, result and params files in place, and a disk that fills completely truncates them.
STORAGE_RESERVE = 64 << 20
RESULT_FILE = "result.json"  # Tune's per-trial results, one JSON line per report
# Tune's experiment and searcher state files, per Tune session, and where `BackUpState` keeps
# their last complete set: a zip archive, named without .json or .pkl because Tune's restore
# copies every such file of the experiment folder into its staging folder, whose every file it
# then copies back at every step.
STATE_FILES = (
    TuneController.CKPT_FILE_TMPL,  # experiment_state-{}.json
    SearchGenerator.CKPT_FILE_TMPL,  # search_gen_state-{}.json
    Searcher.CKPT_FILE_TMPL,  # searcher-state-{}.pkl
)
STATE_BACKUP = ".tune-state"

# What the driver's callbacks work with, set for the length of `fit`: the tracker, the hook told
# when a setting starts, the experiment folder, and (from `tune_search.BySetting`) the folder and
# session name Tune saves its state under. Tune pickles callbacks with the experiment and, on
# restore, brings back those copies instead of taking new ones; the callbacks therefore hold no
# driver objects and find them here.
DRIVER: dict[str, Any] = {}


def storage_full(experiment_dir: str, errors: list[BaseException]) -> bool:
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


def no_space(experiment_dir: str) -> UserError:
    return UserError(
        f"storage_path: no space left under {experiment_dir}; free some space, then run "
        f"`jal-search resume {experiment_dir}` (finished trials are kept)"
    )


class StorageGuard(tune.Callback):
    """Ends the search with a UserError once free space under the storage path drops below
    STORAGE_RESERVE, checked at most once a second on the driver.

    The error leaves Tune's loop like a killed driver would: the state saved at the last step
    (every step, see `tune_adapter.DRIVER_ENV`) is intact, and `resume` continues the unfinished
    trials.
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
            raise no_space(self.experiment_dir)


class BackUpState(tune.Callback):
    """Keeps the last complete set of Tune's experiment and searcher state in STATE_BACKUP.

    Tune rewrites those files in place in a staging folder, and a background sync copies them one
    by one to the experiment folder: a kill mid-copy leaves there a truncated file (resume would
    start the whole search over) or files from two different steps (the searcher then meets
    trials it never suggested). Tune asks callbacks for their state right after writing all of
    its own, so a set taken then is complete and consistent; it is written as one file,
    atomically, and `restore_state` puts it back before a resume.
    """

    def get_state(self) -> None:
        staging, session = DRIVER.get("staging"), DRIVER.get("session")
        experiment = DRIVER.get("experiment_dir")
        if staging is None or session is None or experiment is None:
            return
        # Restored with Tune's state, a copy of the manifest would overwrite the live one.
        Path(staging, MANIFEST).unlink(missing_ok=True)
        backup = Path(experiment, STATE_BACKUP)  # experiments are local or NFS paths
        tmp = backup.with_name(f"{STATE_BACKUP}.tmp")
        with zipfile.ZipFile(tmp, "w") as archive:  # stored: the copy costs what the bytes do
            for name in (template.format(session) for template in STATE_FILES):
                if Path(staging, name).is_file():
                    archive.write(Path(staging, name), name)
        os.replace(tmp, backup)


def restore_state(experiment_dir: Path) -> None:
    """Make Tune's state files the set `BackUpState` last saved, all together.

    State files the set does not hold are removed: older sessions', which Tune no longer reads,
    and any written after the set by a run killed before its next backup, which Tune would
    otherwise take, whatever they hold.
    """
    try:
        archive = zipfile.ZipFile(experiment_dir / STATE_BACKUP)
    except (FileNotFoundError, zipfile.BadZipFile):
        return  # killed before Tune's first save (or the set is damaged): Tune's own files it is
    with archive:
        names = [n for n in archive.namelist() if _is_state_file(n)]  # nothing else, nowhere else
        for pattern in (template.format("*") for template in STATE_FILES):
            for unsaved in experiment_dir.glob(pattern):
                if unsaved.name not in names:
                    unsaved.unlink()
        for name in names:
            tmp = experiment_dir / f".{name}.tmp"
            tmp.write_bytes(archive.read(name))
            os.replace(tmp, experiment_dir / name)


def _is_state_file(name: str) -> bool:
    return "/" not in name and any(fnmatch(name, t.format("*")) for t in STATE_FILES)


class KeepResultsOnRestart(tune.Callback):
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


class ForgetLostCheckpoints(tune.Callback):
    """Drops from a restarting trial's checkpoint list the checkpoints no longer on disk.

    Tune's saved state lags the trial folders by up to a step. A driver killed after Tune deleted
    a trial's oldest checkpoint (it keeps `tune_adapter.CHECKPOINTS_KEPT`) but before it saved
    its state resumes with that checkpoint still listed, and deleting it again fails the trial
    with FileNotFoundError (seen: 1 resume in 8).
    """

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.latest_checkpoint_result is None:
            return  # a fresh start: nothing listed
        manager = trial.run_metadata.checkpoint_manager
        manager._checkpoint_results = [  # experiments are local or NFS paths
            r for r in manager._checkpoint_results if Path(r.checkpoint.path).exists()
        ]


def _epoch(line: str) -> float:
    """A result line's epoch; inf for a line that is not one (half-written: dropped)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class Tracking(tune.Callback):
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
        return DRIVER.get("tracker")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        started = DRIVER.get("on_setting_start")
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
