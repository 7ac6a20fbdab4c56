"""An experiment on disk: its manifest, its lock, and its trials' records — read without Ray.

Layout under `<storage_path>/<name>/`:

    experiment.json       the manifest: spec, noise settings (+ AMSE bound, status), versions
    .lock                 held by the driver that runs or resumes the search
    tune/                 Tune's experiment of the latest run or resume: nothing is read from it
    <setting>/            one folder per noise setting (e.g. symmetric-0.4)
        optuna.journal    the setting's searcher: its Optuna study (every trial asked and told)
        <trial>/          one trial: its journal and checkpoints (`journal.py`)

Failed trials are listed in the manifest (`failures`, trial id → reason) once the search ends.

The trials' journals are the record of what happened, for results and for MLflow sync: each trial
writes its own, an epoch's row before the epoch's checkpoint, so a killed driver, a lost node or
an MLflow outage never loses a finished epoch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from jal_search.errors import UserError

MANIFEST = "experiment.json"
DEFAULT_STORAGE = "jal_results"
STATUSES = ("completed", "stopped", "diverged", "failed", "running")


def experiment_dir(storage_path: str, name: str) -> Path:
    if "://" in storage_path:
        raise UserError(
            f"storage_path: {storage_path!r} is remote; this version keeps experiments on a "
            "local or NFS path (set storage_shared: true for an NFS path on a cluster)"
        )
    return Path(storage_path).expanduser().resolve() / name


def find_experiment(ref: str) -> Path:
    """An experiment folder from a path or a name under ./jal_results."""
    for candidate in (Path(ref), Path(DEFAULT_STORAGE) / ref):
        if (candidate / MANIFEST).is_file():
            return candidate.resolve()
    raise UserError(
        f"experiment {ref!r}: no {MANIFEST} found at {ref} or {DEFAULT_STORAGE}/{ref}; "
        "pass the experiment folder that `jal-search run` printed"
    )


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path / MANIFEST}: unreadable manifest ({err})") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write through a temporary file and a rename: readers never see a partial file.

    A failed write (disk full, no permission) leaves the old file as it was: a UserError.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: {unwritable(err)}") from None


def unwritable(err: OSError) -> str:
    """The end of a one-line message for a file that could not be written."""
    return (
        f"cannot write it ({err.strerror or err}); free some space or fix permissions, "
        "then run the command again"
    )


def update_setting(path: Path, setting: str, **fields: Any) -> None:
    manifest = read_manifest(path)
    for entry in manifest["settings"]:
        if entry["name"] == setting:
            entry.update(fields)
    write_json_atomic(path / MANIFEST, manifest)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the experiment's lock; a second driver on the same experiment is refused.

    flock is released by the kernel when the holder dies, so a killed driver never leaves a stale
    lock behind and `resume` works right after a SIGKILL.
    """
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / ".lock", "w")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"experiment {path.name}: another jal-search process is running it ({path}); "
            "wait for it, or choose another --name"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def provenance() -> dict[str, Any]:
    """Versions and git SHA that every result carries."""
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "git_sha": git_sha(),
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on."""
    found = {}
    for package in ("jal-search", "torch", "ray", "optuna", "mlflow", "pyarrow", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class TrialRecord:
    """One trial as its journal records it (`journal.py`)."""

    setting: str
    trial_id: str
    config: dict[str, Any]  # the sampled parameters
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    error: str | None = None
    resolved: dict[str, Any] | None = None  # the TrialConfig that trained, every knob filled

    def status(self, max_epochs: int, setting_done: bool) -> str:
        """completed / stopped (by ASHA) / diverged / failed / running (setting not finished)."""
        if self.error is not None:
            return "failed"
        if self.history and self.history[-1].get("diverged", 0.0) >= 1.0:
            return "diverged"
        if self.history and self.history[-1].get("epoch", 0) >= max_epochs:
            return "completed"
        return "stopped" if setting_done else "running"


def ended_status(last: dict[str, Any] | None, max_epochs: int) -> str:
    """How a trial's run ended, from its last row (`TrialRecord.status` of a finished one)."""
    return TrialRecord("", "", {}, [last] if last else []).status(max_epochs, True)


# The config keys Tune trials carry besides the sampled parameters: one Tune experiment runs every
# noise setting (SETTING), and each trial is named by its searcher (TRIAL, e.g. "t00007"), which
# is also its folder under the setting's.
SETTING = "setting"
TRIAL = "trial"


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A search stops (resumably) when less than this is free under the storage path: checkpoints and
# journals cannot be written on a full disk, and every trial would fail and burn its retries.
STORAGE_RESERVE = 64 << 20


def storage_full(experiment_dir: str, errors: list[BaseException]) -> bool:
    """Whether trials failed, or Tune broke, because the storage path is full.

    On a full disk every trial fails (its checkpoint cannot be written) and burns its retries; a
    setting ended that way must stay unfinished so that `resume` reruns those trials once there
    is space again. Full: a trial failed with ENOSPC/EDQUOT, or less than STORAGE_RESERVE is left.
    """
    causes = [getattr(e, "cause", None) or e for e in errors]
    if any(isinstance(c, OSError) and c.errno in STORAGE_ERRNOS for c in causes):
        return True
    return _low_on_space(experiment_dir)


def no_space(experiment_dir: str) -> UserError:
    return UserError(
        f"storage_path: no space left under {experiment_dir}; free some space, then run "
        f"`jal-search resume {experiment_dir}` (finished trials are kept)"
    )


def check_space(experiment_dir: str) -> None:
    """Raise `no_space` once less than STORAGE_RESERVE is free under the storage path."""
    if _low_on_space(experiment_dir):
        raise no_space(experiment_dir)


def _low_on_space(experiment_dir: str) -> bool:
    try:
        return shutil.disk_usage(experiment_dir).free < STORAGE_RESERVE
    except OSError:  # not created yet, or not a local path
        return False


def refuse_older_layout(experiment_dir: Path, settings: Sequence[str]) -> None:
    """Refuse, before Ray starts, an experiment an older version made: its record was Tune's
    state files (`tuner.pkl`, in the experiment folder or in each setting's), which this one
    does not read."""
    folders = [experiment_dir, *(experiment_dir / name for name in settings)]
    if any((folder / "tuner.pkl").is_file() for folder in folders):
        raise UserError(
            f"{experiment_dir}: made by an older jal-search (its record is Tune's state files, "
            "not trial journals), which this version cannot resume; finish it with that "
            "version, or run the spec again under a new --name"
        )


def sampled(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's sampled parameters: its config without SETTING and TRIAL."""
    return {k: v for k, v in config.items() if k not in (SETTING, TRIAL)}


def trial_header(params: dict[str, Any], config: Any) -> dict[str, Any]:
    """A trial journal's first line: which trial it is and exactly what trains (`config`, the
    resolved TrialConfig)."""
    return {
        "trial": params[TRIAL],
        "setting": params[SETTING],
        "params": sampled(params),
        "config": config.model_dump(mode="json"),
        "versions": versions(),  # no git subprocess per trial: the manifest has the SHA
        "started": time.time(),
    }


def ended(row: dict[str, Any] | None, epochs: int) -> bool:
    """Whether a trial whose last row is `row` has ended: its whole budget run, or diverged."""
    return bool(row) and (row["epoch"] >= epochs or row.get("diverged", 0.0) >= 1.0)


def read_trials(path: Path, setting: str, failures: dict[str, str]) -> list[TrialRecord]:
    """Every trial of one setting, sorted by trial id, as their
    journals hold them; `failures` maps trial ids to the reason they finally failed (from the
    manifest). Rows also carry `training_iteration` (their epoch) and `time_total_s` (the
    trial's training time up to that epoch), for the tables."""
    from jal_search.journal import read_journal

    records = []
    folder = path / setting
    if not folder.is_dir():
        return records
    for trial_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        header, rows = read_journal(trial_dir)
        if header is None:
            continue  # not a trial
        history, total = [], 0.0
        for r in rows:
            total += r.get("epoch_seconds", 0.0)
            history.append({**r, "training_iteration": int(r["epoch"]), "time_total_s": total})
        records.append(
            TrialRecord(
                setting,
                trial_dir.name,
                dict(header.get("params") or {}),
                history,
                failures.get(trial_dir.name),
                header.get("config"),
            )
        )
    return records
