"""An experiment on disk: its manifest, its lock, and its trials' records — read without Ray.

Layout under `<storage_path>/<name>/`:

    experiment.json       the manifest: spec, noise settings (+ AMSE bound, status), versions
    .lock                 held by the driver that runs or resumes the search
    experiment_state-*.json, tuner.pkl, searcher-state-*.pkl, …   Tune's (one experiment)
    .tune-state           the last complete set of Tune's state files, put back on resume
    <setting>/            one folder per noise setting (e.g. symmetric-0.4)
        <trial_id>/result.json   one JSON line per epoch (metrics, config, training_iteration)

Failed trials are listed in the manifest (`failures`, trial id → reason) once the search ends:
Tune's own `error.txt` also appears for trials that failed and then succeeded on retry.

Tune's per-trial files are the source of truth for results and for MLflow sync: they are written
on every report and survive an MLflow outage or a killed driver.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import subprocess
from collections.abc import Iterator
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
    versions = {}
    for package in ("jal-search", "torch", "ray", "optuna", "mlflow", "pyarrow", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "git_sha": git_sha(),
        "versions": versions,
    }


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
    """One trial as Tune left it on disk."""

    setting: str
    trial_id: str
    config: dict[str, Any]  # the sampled parameters
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    error: str | None = None

    def status(self, max_epochs: int, setting_done: bool) -> str:
        """completed / stopped (by ASHA) / diverged / failed / running (setting not finished)."""
        if self.error is not None:
            return "failed"
        if self.history and self.history[-1].get("diverged", 0.0) >= 1.0:
            return "diverged"
        if self.history and self.history[-1].get("training_iteration", 0) >= max_epochs:
            return "completed"
        return "stopped" if setting_done else "running"


# A packed Tune trial (spec `pack: K`) trains several configs: its config holds their sampled
# parameters under MEMBERS, and each result row their metrics under MEMBERS, keyed "0", "1", ….
# Everywhere downstream (results, MLflow) each member is a trial of its own, `<trial id>-m<k>`.
MEMBERS = "members"
# The config key naming a trial's noise setting: one Tune experiment runs every setting.
SETTING = "setting"
# The checkpoint key holding the trial's config, as params.json does.
TRIAL_CONFIG = "trial_config"


def unpack(
    trial_id: str, config: dict[str, Any], row: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(trial id, parameters, result row) of each config a Tune trial trains.

    A plain trial is itself; a pack gives one entry per member, whose row is the pack's row with
    the member's metrics in place of the pack's (None when the member did not train that epoch).
    """
    members = config.get(MEMBERS)
    if members is None:
        return [(trial_id, {k: v for k, v in config.items() if k != SETTING}, row)]
    shared = None if row is None else {k: v for k, v in row.items() if k != MEMBERS}
    out = []
    for k, params in enumerate(members):
        mine = None if row is None else (row.get(MEMBERS) or {}).get(str(k))
        merged = None if shared is None or mine is None else {**shared, **mine}
        out.append((f"{trial_id}-m{k}", params, merged))
    return out


def read_trials(path: Path, setting: str, failures: dict[str, str]) -> list[TrialRecord]:
    """Every trial of one setting (a pack's members one by one), sorted by trial id; tolerant of
    a half-written last line.

    Tune rewrites a trial's params.json and result.json in place, and a kill while it copies them
    to the storage path can empty them, or a restart can lose rows; every checkpoint holds the
    trial's config and whole history, so what the files lost comes back from the newest one.
    `failures` maps trial ids to the reason they finally failed (from the manifest).
    """
    records = []
    folder = path / setting
    if not folder.is_dir():
        return records
    for trial_dir in sorted(p for p in folder.iterdir() if (p / "params.json").is_file()):
        rows, config = _result_rows(trial_dir)
        with contextlib.suppress(json.JSONDecodeError):
            config = json.loads((trial_dir / "params.json").read_text()) or config
        saved = _newest_checkpoint(trial_dir) if _files_lost(trial_dir, rows, config) else None
        config = config or (saved or {}).get(TRIAL_CONFIG, {})
        error = failures.get(trial_dir.name)
        unpacked = [unpack(trial_dir.name, config, r) for r in rows]
        for k, (trial_id, params, _) in enumerate(unpack(trial_dir.name, config)):
            kept = _rewound([u[k][2] for u in unpacked if u[k][2] is not None])
            if saved is None and _has_gaps(kept):
                saved = _newest_checkpoint(trial_dir)
            if saved is not None:
                history = saved["histories"][k] if "histories" in saved else saved["history"]
                kept = _with_missing_filled(kept, history)
            records.append(TrialRecord(setting, trial_id, params, kept, error))
    return records


def _result_rows(trial_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """result.json's rows without their `config`, and that config (every row carries it)."""
    rows, config = [], {}
    result = trial_dir / "result.json"
    if result.is_file():
        for line in result.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                config = config or row.get("config") or {}
                row.pop("config", None)
                rows.append(row)
    return rows, config


def _files_lost(trial_dir: Path, rows: list[dict[str, Any]], config: dict[str, Any]) -> bool:
    """Whether params.json or result.json lost what the trial's checkpoints hold.

    Tune numbers a trial's checkpoints one per report: fewer rows than the newest number says
    rows are missing (or, after a restart, were rewound; reading the checkpoint is then harmless).
    """
    names = (p.name.removeprefix("checkpoint_") for p in trial_dir.glob("checkpoint_*"))
    newest = max((int(n) for n in names if n.isdigit()), default=None)
    if newest is None:
        return False
    return not config or len(rows) < newest + 1


def _has_gaps(rows: list[dict[str, Any]]) -> bool:
    return [r["training_iteration"] for r in rows] != list(range(1, len(rows) + 1))


def _newest_checkpoint(trial_dir: Path) -> dict[str, Any] | None:
    """The state in the trial's newest readable checkpoint; None if there is none."""
    from jal_search.train import CheckpointError, load_checkpoint

    for folder in sorted(trial_dir.glob("checkpoint_*"), reverse=True):
        with contextlib.suppress(CheckpointError):
            return load_checkpoint(folder)
    return None


def _with_missing_filled(
    rows: list[dict[str, Any]], history: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`rows` with the epochs they lack taken from `history`, in epoch order; restored rows are
    marked `restored_from_checkpoint` (they lack Tune's fields, e.g. node_id)."""
    present = {r["training_iteration"] for r in rows}
    restored = [
        {**m, "training_iteration": int(m["epoch"]), "restored_from_checkpoint": True}
        for m in history
        if int(m["epoch"]) not in present
    ]
    return sorted(rows + restored, key=lambda r: r["training_iteration"])


def _rewound(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch of the run that produced the trial's final state.

    A retried trial re-reports from where it resumed: a row for epoch e replaces every row from
    epoch e on. Epochs are the trial's own `epoch` metric, set back into `training_iteration`:
    Tune's counter keeps counting when a trial restarts from epoch 0 (its checkpoint was
    unreadable), so it can exceed the epochs actually trained.
    """
    kept: list[dict[str, Any]] = []
    for row in rows:
        epoch = row.get("epoch", row.get("training_iteration"))
        if epoch is None:
            continue
        kept = [r for r in kept if r["training_iteration"] < int(epoch)]
        kept.append({**row, "training_iteration": int(epoch)})
    return kept
