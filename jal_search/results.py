"""A search's results as tables, the best config per noise setting, export, and final summaries.

Everything is read from the trials' journals (`experiment.read_trials`), never from MLflow,
which may be partial. Files under `<experiment>/results/`, each written atomically (a temporary
file, then `os.replace`: a crash never leaves a half-written file):

    epochs.parquet   one row per trial per reported epoch          columns: COLUMNS (e)
    trials.parquet   one row per trial                             columns: COLUMNS (t)
    best.json        the selection: metric, scope, best trial per setting
    final.parquet    multi-seed re-evaluation of the best configs  columns: FINAL_SCHEMA
    final.md         its markdown table (rows = losses, columns = noise settings)

Columns are defined once, in `COLUMNS` (name, arrow type, tables, meaning); the meaning is also
stored as each parquet field's `doc` metadata. The searched hyperparameters become float64
columns `param_<name>` (sorted by name, right after `trial_id`); a parameter a setting does not
search is null there. NaN means "reported but not computable" (e.g. `val_acc` of a diverged
epoch); null means "not reported".

Selection (`select_best`) ranks the trials of each setting by validation accuracy — never by
test accuracy, which is carried along for reporting only. The scope says which epochs count:

    last         val_acc at the trial's last reported epoch, whatever epoch that is
    best-epoch   the highest val_acc over the epochs reported (test_acc at that same epoch;
                 the earliest such epoch on ties)
    last-k-mean  the mean val_acc over the trial's last min(k, epochs reached) epochs (test_acc:
                 the mean over those of them that evaluated the test set)

A search evaluates the test set only at the epochs a trial may end on, unless its spec says
`test_eval: every_epoch` (`metrics.evaluates_test_set`): the scheduler's rungs and the budget's
last epoch. So `last` always has its test_acc; `best-epoch` has it where the best epoch is one
of those (else NaN), `last-k-mean` over those of its epochs.

A trial stopped early by ASHA competes with the epochs it reached: a trial stopped at epoch 2
is judged on epochs 1–2 against others' full runs. (ASHA stopped it because it trailed at a
rung, so it rarely wins; when it does, the rerun of its config uses the full budget.) Failed and
diverged trials never win, nor does a trial whose scored epochs lack a finite val_acc. Ties go
to the trial that reached more epochs, then to the smaller trial id. Trials of a setting still
running compete with what they have reported so far (their status says `running`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from jal_search import experiment as exp
from jal_search.config import TrialConfig, trial_config
from jal_search.errors import UserError
from jal_search.journal import JOURNAL
from jal_search.metrics import METRICS, SELECTION
from jal_search.spec import SearchSpec, SettingPlan, parse_spec, plan

RESULTS_DIR = "results"
SCOPES = ("last", "best-epoch", "last-k-mean")
METRIC = SELECTION  # the selection metric; test_acc is reported only
ELIGIBLE = ("completed", "stopped", "running")  # statuses that may win a selection
TIE_RULE = "ties go to the trial that reached more epochs, then to the smaller trial id"
PARAM_PREFIX = "param_"
EXPORT_SUFFIXES = (".yaml", ".yml", ".json")

FINAL = [m for m in METRICS if m.final]  # the trials table's final_<name> columns
# The one definition of the table columns: (name, type, tables: e = epochs, t = trials, meaning);
# the per-epoch metrics' own from `metrics.METRICS`.
COLUMNS: tuple[tuple[str, pa.DataType, str, str], ...] = (
    ("experiment", pa.string(), "et", "the experiment's name (its manifest's `name`)"),
    ("loss", pa.string(), "et", "the spec's loss, as written there (e.g. jal_ce)"),
    ("setting", pa.string(), "et", "noise setting id, e.g. symmetric-0.4, human-worst"),
    ("noise_type", pa.string(), "et", "clean, symmetric, asymmetric, dependent, human, custom"),
    ("noise_rate", pa.float64(), "et", "nominal noise rate; null for human/custom label sets"),
    ("trial_id", pa.string(), "et", "the trial's name in its setting, e.g. t00007 (its folder)"),
    # param_<name> columns go here (float64, one per searched hyperparameter)
    ("epoch", pa.int32(), "e", "1-based epoch"),
    *((m.name, pa.float64(), m.tables, m.meaning) for m in METRICS if m.tables),
    ("time_total_s", pa.float64(), "et", "the trial's training time up to this (the last) epoch"),
    ("diverged", pa.bool_(), "e", "the epoch's loss was not finite (the trial ends there)"),
    ("label_hash", pa.string(), "et", "hash of the trial's noisy label vector"),
    ("status", pa.string(), "t", "completed, stopped (by ASHA), diverged, failed, running"),
    ("failure", pa.string(), "t", "why a failed trial failed; null otherwise"),
    ("epochs", pa.int32(), "t", "epochs the trial reached (0 if it reported none)"),
    ("max_epochs", pa.int32(), "t", "the search's epoch budget per trial"),
    *((f"final_{m.name}", pa.float64(), "t", f"{m.name} at the last epoch reached") for m in FINAL),
    ("best_epoch", pa.int32(), "t", "epoch of the highest finite val_acc (earliest on ties)"),
    ("best_val_acc", pa.float64(), "t", "val_acc at best_epoch"),
    ("best_test_acc", pa.float64(), "t", "test_acc at best_epoch"),
    ("seed", pa.int64(), "t", "the trial's seed (model init, batch order, augmentation)"),
    ("noise_seed", pa.int64(), "t", "the seed of its noisy labels"),
    ("a_min", pa.float64(), "t", "AMSE's lower bound on `a` for the setting; null if none"),
    ("below_a_min", pa.bool_(), "t", "param_a < a_min (kept under amse_bound: flag); else null"),
    ("mlflow_run_id", pa.string(), "t", "the trial's MLflow run; null until tracking sets it"),
)

FINAL_SCHEMA = pa.schema(
    [
        pa.field("setting", pa.string(), nullable=False),
        pa.field("loss", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("test_acc", pa.float64()),
        pa.field("val_acc", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
    ]
)

# What a selection scores (val_acc) and reports at the same epochs.
SCORED = ("val_acc", "test_acc", "val_acc_clean_est", "val_acc_clean_lo", "val_acc_clean_hi")
_EPOCH_METRICS = (*(m.name for m in METRICS if "e" in m.tables), "time_total_s")


def schema(table: str, params: Sequence[str]) -> pa.Schema:
    """The schema of `epochs` (table="e") or `trials` (table="t") for these parameter names."""
    fields = []
    for name, dtype, tables, meaning in COLUMNS:
        if table in tables:
            fields.append(pa.field(name, dtype, metadata={"doc": meaning}))
        if name == "trial_id":
            fields += [
                pa.field(PARAM_PREFIX + p, pa.float64(), metadata={"doc": f"sampled value of {p}"})
                for p in params
            ]
    return pa.schema(fields)


def columns_markdown() -> str:
    """The column table for the README: name, type, tables, meaning."""
    lines = ["| column | type | in | meaning |", "|---|---|---|---|"]
    for name, dtype, tables, meaning in COLUMNS:
        where = ", ".join({"e": "epochs", "t": "trials"}[t] for t in tables)
        lines.append(f"| `{name}` | {dtype} | {where} | {meaning} |")
        if name == "trial_id":
            lines.append("| `param_<name>` | double | epochs, trials | sampled hyperparameter |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the experiment
@dataclass(frozen=True)
class Setting:
    """One noise setting as the manifest and its trials' journals describe it."""

    name: str
    plan: SettingPlan
    status: str  # pending / running / done (the manifest's)
    a_min: float | None
    trials: list[exp.TrialRecord]
    mlflow_runs: dict[str, str]  # trial id → MLflow run id


@dataclass(frozen=True)
class Experiment:
    """A search as read from disk: validated manifest, spec and every trial's records."""

    path: Path
    name: str
    manifest: dict[str, Any]
    spec: SearchSpec
    settings: list[Setting]
    params: list[str]  # searched hyperparameter names, sorted: the param_<name> columns

    @property
    def results_dir(self) -> Path:
        return self.path / RESULTS_DIR


Ref = str | Path | Experiment  # an experiment folder, its name under ./jal_results, or loaded


def load_experiment(ref: str | Path) -> Experiment:
    """Read and check an experiment folder; anything corrupt or missing is one UserError.

    A setting marked done must have its folder; every trial must carry each searched parameter.
    An intact experiment without trials yet loads (its tables are empty); the verbs that produce
    output refuse it (`with_trials`). The manifest may carry `mlflow_runs: {setting: {trial_id:
    run_id}}`, written by tracking: it fills the `mlflow_run_id` column.
    """
    path = exp.find_experiment(str(ref))
    manifest = exp.read_manifest(path)
    where = path / exp.MANIFEST
    if not isinstance(manifest, dict):
        raise UserError(f"{where}: damaged manifest (not a JSON object); restore the folder")
    for key, kind in (("name", str), ("spec", dict), ("settings", list)):
        if not isinstance(manifest.get(key), kind):
            raise UserError(
                f"{where}: damaged manifest ({key!r} missing or not a {kind.__name__}); "
                "restore the experiment folder from a copy"
            )
    spec = parse_spec(manifest["spec"], where=f"{exp.MANIFEST}:spec")
    plans = {p.name: p for p in plan(spec)}
    runs = manifest.get("mlflow_runs") or {}
    if not isinstance(runs, dict):
        raise UserError(f"{where}: damaged manifest ('mlflow_runs' is not a mapping)")
    settings = []
    for i, entry in enumerate(manifest["settings"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in plans:
            raise UserError(
                f"{where}: settings[{i}] names {name!r}, not a noise setting of its spec "
                f"({', '.join(plans)}); restore the manifest"
            )
        status = entry.get("status", "pending")
        if status == "done" and not (path / name).is_dir():
            raise UserError(
                f"{path / name}: missing, but the manifest marks setting {name} done; "
                "copy the whole experiment folder, not just its manifest"
            )
        trials = exp.read_trials(path, name, entry.get("failures") or {})
        if status == "done" and not trials:
            raise UserError(
                f"{path / name}: no trial folders, but the manifest marks setting {name} done; "
                "copy the whole experiment folder"
            )
        for record in trials:
            missing = [k for k in plans[name].space if not _is_number(record.config.get(k))]
            if missing or record.resolved is None:
                what = f"no numeric value for {missing[0]!r}" if missing else "no config"
                raise UserError(
                    f"{path / name / record.trial_id / JOURNAL}: {what} in its header; the "
                    "trial folder is damaged: restore or remove it"
                )
        a_min = entry.get("a_min")
        settings.append(
            Setting(name, plans[name], status, a_min, trials, dict(runs.get(name) or {}))
        )
    params = sorted({k for s in settings for k in s.plan.space} | _sampled_keys(settings))
    return Experiment(path, manifest["name"], manifest, spec, settings, params)


def experiment(ref: Ref) -> Experiment:
    """An already loaded experiment as is, else `load_experiment(ref)`."""
    return ref if isinstance(ref, Experiment) else load_experiment(ref)


def with_trials(ref: Ref) -> Experiment:
    """The experiment, or a UserError when no trial has started yet."""
    ex = experiment(ref)
    if not any(s.trials for s in ex.settings):
        raise UserError(f"experiment {ex.path}: no trials yet; run or resume it first")
    return ex


def _sampled_keys(settings: Iterable[Setting]) -> set[str]:
    return {k for s in settings for r in s.trials for k, v in r.config.items() if _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _ids(ex: Experiment, s: Setting, record: exp.TrialRecord) -> dict[str, Any]:
    rate = s.plan.setting.rate
    return {
        "experiment": ex.name,
        "loss": ex.spec.loss,
        "setting": s.name,
        "noise_type": s.plan.setting.type,
        "noise_rate": float(rate) if _is_number(rate) else None,
        "trial_id": record.trial_id,
        **{PARAM_PREFIX + p: _number(record.config.get(p)) for p in ex.params},
    }


# ---------------------------------------------------------------------------------------- tables
def epochs_table(ref: Ref) -> pa.Table:
    """One row per trial per reported epoch (columns: COLUMNS marked e)."""
    ex = experiment(ref)
    rows = []
    for s in ex.settings:
        for record in s.trials:
            ids = _ids(ex, s, record)
            for h in record.history:
                rows.append(
                    {
                        **ids,
                        "epoch": int(h["training_iteration"]),
                        **{m: _number(h.get(m)) for m in _EPOCH_METRICS},
                        "diverged": float(h.get("diverged", 0.0)) >= 1.0,
                        "label_hash": h.get("label_hash"),
                    }
                )
    return pa.Table.from_pylist(rows, schema=schema("e", ex.params))


def trials_table(ref: Ref) -> pa.Table:
    """One row per trial (columns: COLUMNS marked t)."""
    ex = experiment(ref)
    max_epochs = ex.spec.budget.epochs
    rows = []
    for s in ex.settings:
        for record in s.trials:
            history = record.history
            last = history[-1] if history else {}
            scored = [h for h in history if _finite(h.get("val_acc"))]
            peak = max(scored, key=lambda h: h["val_acc"]) if scored else {}  # earliest on ties
            config = recorded_config(ex, s.name, record.trial_id)
            a, a_min = _number(record.config.get("a")), s.a_min
            rows.append(
                {
                    **_ids(ex, s, record),
                    "status": record.status(max_epochs, s.status == "done"),
                    "failure": record.error,
                    "epochs": int(last.get("training_iteration", 0)),
                    "max_epochs": max_epochs,
                    **{f"final_{m.name}": _number(last.get(m.name)) for m in FINAL},
                    "best_epoch": int(peak["training_iteration"]) if peak else None,
                    "best_val_acc": _number(peak.get("val_acc")),
                    "best_test_acc": _number(peak.get("test_acc")),
                    "seed": config.seed,
                    "noise_seed": config.labels_seed,
                    "label_hash": last.get("label_hash"),
                    "noise_realised": _number(last.get("noise_realised")),
                    "time_total_s": _number(last.get("time_total_s")),
                    "a_min": a_min,
                    "below_a_min": None if a is None or a_min is None else a < a_min,
                    "mlflow_run_id": s.mlflow_runs.get(record.trial_id),
                }
            )
    return pa.Table.from_pylist(rows, schema=schema("t", ex.params))


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def atomic_write(target: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` then move tmp over `target`: readers never see a partial file.

    A failed write (disk full, no permission) leaves `target` as it was: a UserError.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise UserError(f"{target}: {exp.unwritable(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_tables(
    ref: Ref, scope: str = "last", last_k: int = 3, out: Path | None = None
) -> dict[str, Path]:
    """Write epochs.parquet, trials.parquet and best.json (the selection) into `out` (default
    results/)."""
    ex = with_trials(ref)
    epochs, trials = epochs_table(ex), trials_table(ex)
    chosen = select_best(trials, epochs, scope, last_k)
    out = out or ex.results_dir
    return {
        "epochs": atomic_write(out / "epochs.parquet", lambda p: pq.write_table(epochs, p)),
        "trials": atomic_write(out / "trials.parquet", lambda p: pq.write_table(trials, p)),
        "best": atomic_write(
            out / "best.json",
            lambda p: p.write_text(json.dumps(_selection_doc(chosen, scope, last_k), indent=2)),
        ),
    }


# ------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """One trial as a candidate of its setting under a scope (see the module docstring)."""

    setting: str
    trial_id: str
    scope: str
    val_acc: float  # the score: val_acc as the scope defines it
    test_acc: float  # test_acc at the same epoch(s) — reported only
    epochs: int  # epochs the trial reached
    status: str
    params: dict[str, float]
    # val_acc_clean_est and its 95% interval at the same epoch(s) — reported only; over several
    # epochs (last-k-mean) the means of the ends, wider than the mean's own interval
    clean: tuple[float, float, float] = (math.nan, math.nan, math.nan)


def recorded_config(ex: Experiment, setting: str, trial_id: str) -> TrialConfig:
    """The config a trial trained, as its journal recorded it (never recomputed from today's
    spec, profiles or loss tables, which may have changed since)."""
    s = next(s for s in ex.settings if s.name == setting)
    record = next(r for r in s.trials if r.trial_id == trial_id)
    where = f"{ex.path / setting / trial_id / JOURNAL}:config"
    return trial_config(record.resolved or {}, where=where)


def check_scope(scope: str, last_k: int) -> None:
    if scope not in SCOPES:
        raise UserError(f"scope: {scope!r} is not one of {', '.join(SCOPES)}")
    if last_k < 1:
        raise UserError(f"last_k: {last_k} must be at least 1 (epochs averaged by last-k-mean)")


def rank(
    trials: pa.Table, epochs: pa.Table, scope: str = "last", last_k: int = 3
) -> dict[str, list[Selection]]:
    """Per setting (in table order), its eligible trials best first; settings without any
    eligible trial map to an empty list."""
    check_scope(scope, last_k)
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in epochs.select(["setting", "trial_id", "epoch", *SCORED]).to_pylist():
        curves.setdefault((row["setting"], row["trial_id"]), []).append(row)
    ranked: dict[str, list[Selection]] = {}
    for t in trials.to_pylist():
        candidates = ranked.setdefault(t["setting"], [])
        curve = sorted(curves.get((t["setting"], t["trial_id"]), []), key=lambda r: r["epoch"])
        score = _score(curve, scope, last_k)
        if t["status"] not in ELIGIBLE or score is None:
            continue
        params = {
            k.removeprefix(PARAM_PREFIX): v
            for k, v in t.items()
            if k.startswith(PARAM_PREFIX) and v is not None
        }
        val, test, clean = score
        candidates.append(
            Selection(
                t["setting"],
                t["trial_id"],
                scope,
                val,
                test,
                t["epochs"],
                t["status"],
                params,
                clean,
            )
        )
    for candidates in ranked.values():
        candidates.sort(key=lambda c: (-c.val_acc, -c.epochs, c.trial_id))
    return ranked


def _score(
    curve: list[dict[str, Any]], scope: str, last_k: int
) -> tuple[float, float, tuple[float, float, float]] | None:
    """(val score, matching test accuracy, matching clean estimate and interval), or None when
    the scored epochs lack a finite val."""
    if not curve:
        return None
    if scope == "best-epoch":
        scored = [r for r in curve if _finite(r["val_acc"])]
        if not scored:
            return None
        window = [max(scored, key=lambda r: r["val_acc"])]  # max keeps the earliest on ties
    else:
        window = curve[-1:] if scope == "last" else curve[-last_k:]
        if not all(_finite(r["val_acc"]) for r in window):
            return None
    val, test, *clean = (_mean([r[k] for r in window if r[k] is not None]) for k in SCORED)
    return val, test, (clean[0], clean[1], clean[2])


def _mean(values: list[float]) -> float:
    """The mean of what was reported (a trial evaluates the test set at some epochs only:
    `metrics.evaluates_test_set`); NaN when nothing was."""
    return statistics.fmean(values) if values else math.nan


def select_best(
    trials: pa.Table, epochs: pa.Table, scope: str = "last", last_k: int = 3
) -> dict[str, Selection]:
    """The best trial per setting under `scope`; settings with no eligible trial are absent."""
    return {s: c[0] for s, c in rank(trials, epochs, scope, last_k).items() if c}


def best(ref: Ref, scope: str = "last", last_k: int = 3) -> dict[str, Selection]:
    """`select_best` on an experiment folder."""
    ex = experiment(ref)
    return select_best(trials_table(ex), epochs_table(ex), scope, last_k)


def _selection_meta(scope: str, last_k: int) -> dict[str, Any]:
    """How a selection was made, as stored with its results (best.json, exports)."""
    return {"metric": METRIC, "scope": scope, "last_k": last_k if scope == "last-k-mean" else None}


def _selection_doc(chosen: dict[str, Selection], scope: str, last_k: int) -> dict[str, Any]:
    return {
        **_selection_meta(scope, last_k),
        "best": {
            name: {
                "trial_id": s.trial_id,
                "val_acc": s.val_acc,
                "test_acc": s.test_acc,
                "epochs": s.epochs,
                "status": s.status,
                "params": s.params,
                "val_acc_clean_est": dict(zip(("estimate", "low", "high"), s.clean, strict=True)),
            }
            for name, s in chosen.items()
        },
    }


def clean_text(clean: tuple[float, float, float]) -> str:
    """val_acc_clean_est and its interval as `0.9123 [0.8950, 0.9290]`; `–` when undefined."""
    est, lo, hi = clean
    return "–" if not _finite(est) else f"{est:.4f} [{lo:.4f}, {hi:.4f}]"


def scope_label(scope: str, last_k: int) -> str:
    return f"last-{last_k}-mean" if scope == "last-k-mean" else scope


def top_table(ref: Ref, k: int = 5, scope: str = "last", last_k: int = 3) -> str:
    """The top-k trials of each setting, for the terminal: selection metric first."""
    ex = with_trials(ref)
    trials = trials_table(ex)
    ranked = rank(trials, epochs_table(ex), scope, last_k)
    statuses: dict[str, list[str]] = {}
    for row in trials.select(["setting", "status"]).to_pylist():
        statuses.setdefault(row["setting"], []).append(row["status"])
    lines = [
        f"selection: {METRIC} on {ex.spec.val_labels} validation labels, scope "
        f"{scope_label(scope, last_k)}; {TIE_RULE}; test_acc is reported only",
        "clean est: the validation accuracy on clean labels estimated from val_acc through the "
        "noise's transition matrix, with its 95% interval (– where the matrix is unknown)",
    ]
    if scope != "last" and ex.spec.test_eval == "milestones":
        lines.append(
            "test_acc: evaluated at the scheduler's rungs and each trial's last epoch only (spec "
            "test_eval: milestones): nan where the scope's epochs lack it"
        )
    for setting, candidates in ranked.items():
        counts = ", ".join(
            f"{statuses[setting].count(s)} {s}" for s in exp.STATUSES if s in statuses[setting]
        )
        lines += ["", f"{setting}  ({counts})"]
        if not candidates:
            lines.append("  no eligible trial (all failed or diverged)")
            continue
        header = (
            f"{'#':>2} {'trial':10} {'val_acc':>8} {'clean est [95%]':>23} {'test_acc':>8} "
            f"{'epochs':>6}  params"
        )
        lines.append("  " + header)
        for i, c in enumerate(candidates[:k], 1):
            params = ", ".join(f"{p}={v:.4g}" for p, v in sorted(c.params.items()))
            lines.append(
                f"  {i:>2} {c.trial_id:10} {c.val_acc:8.4f} {clean_text(c.clean):>23} "
                f"{c.test_acc:8.4f} {c.epochs:6d}  {params}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- export
def export(ref: Ref, out: Path, scope: str = "last", last_k: int = 3) -> Path:
    """Write the best config per setting — resolved, complete, self-contained — to YAML/JSON.

    Each setting's `config` is the `TrialConfig` that `jal-search train --config OUT --setting
    NAME` reruns unchanged: the setting's base config with the best trial's sampled parameters,
    resolved (every knob filled). It trains the spec's full epoch budget, whatever epoch the
    selection scored.
    """
    out = Path(out)
    if out.suffix.lower() not in EXPORT_SUFFIXES:
        raise UserError(f"--out: {out} must end in {', '.join(EXPORT_SUFFIXES)}")
    ex = with_trials(ref)
    chosen = select_best(trials_table(ex), epochs_table(ex), scope, last_k)
    if not chosen:
        raise UserError(f"experiment {ex.path}: no eligible trial to export (all failed/diverged)")
    doc = {
        "source": {
            "experiment": ex.name,
            "path": str(ex.path),
            "git_sha": ex.manifest.get("git_sha"),
            "created": ex.manifest.get("created"),
        },
        "selection": {**_selection_meta(scope, last_k), "val_labels": ex.spec.val_labels},
        "settings": {
            name: {
                "trial_id": s.trial_id,
                "val_acc": s.val_acc,
                "test_acc": s.test_acc,
                "epochs_reached": s.epochs,
                "config": recorded_config(ex, name, s.trial_id).model_dump(mode="json"),
            }
            for name, s in chosen.items()
        },
    }
    if out.suffix.lower() == ".json":
        text = json.dumps(doc, indent=2)
    else:
        text = yaml.safe_dump(doc, sort_keys=False)
    return atomic_write(out, lambda p: p.write_text(text))


# --------------------------------------------------------------------------- final and compare
def final_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows {setting, loss, seed, test_acc, val_acc, status} as a FINAL_SCHEMA table."""
    for row in rows:
        missing = [f.name for f in FINAL_SCHEMA if f.name not in row]
        if missing:
            raise ValueError(f"final_table: row {row} lacks {missing}")
    return pa.Table.from_pylist([dict(r) for r in rows], schema=FINAL_SCHEMA)


def write_final(ref: Ref, rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write results/final.parquet and results/final.md (its markdown table)."""
    ex = experiment(ref)
    table = final_table(rows)
    out = ex.results_dir
    final = atomic_write(out / "final.parquet", lambda p: pq.write_table(table, p))
    markdown = markdown_final(ex)
    return {
        "final": final,
        "final_md": atomic_write(out / "final.md", lambda p: p.write_text(markdown + "\n")),
    }


@dataclass(frozen=True)
class Summary:
    """Test accuracy over the seeds of one config: completed seeds only, sample std."""

    mean: float
    std: float | None  # None for a single value
    n: int  # seeds that completed with a finite test_acc
    total: int  # seeds run
    single_run: bool = False  # the search trial itself, not a re-evaluation

    def cell(self) -> str:
        if self.n == 0:
            return f"– (0 of {self.total})"
        text = f"{100 * self.mean:.2f}"
        if self.std is not None:
            text += f" ± {100 * self.std:.2f}"
        if self.single_run:
            return f"{text} (search, n=1)"
        shown = f"{self.n}" if self.n == self.total else f"{self.n} of {self.total}"
        return f"{text} (n={shown})"


def summarise(values: Sequence[tuple[float | None, str]]) -> Summary:
    """Mean ± sample std of test accuracies given as (test_acc, status) per seed."""
    kept = [v for v, status in values if status == "completed" and v is not None and _finite(v)]
    if not kept:
        return Summary(math.nan, None, 0, len(values))
    std = statistics.stdev(kept) if len(kept) > 1 else None
    return Summary(statistics.fmean(kept), std, len(kept), len(values))


def _read_final(ex: Experiment) -> dict[str, Summary] | None:
    """Per setting, the summary of results/final.parquet; None when it does not exist."""
    file = ex.results_dir / "final.parquet"
    if not file.is_file():
        return None
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"{file}: unreadable ({err}); rerun `jal-search evaluate`") from None
    missing = [f.name for f in FINAL_SCHEMA if f.name not in table.column_names]
    if missing:
        raise UserError(f"{file}: no column {missing[0]!r}; rerun `jal-search evaluate`")
    per_setting: dict[str, list[tuple[float | None, str]]] = {}
    for row in table.select(["setting", "test_acc", "status"]).to_pylist():
        per_setting.setdefault(row["setting"], []).append((row["test_acc"], row["status"]))
    return {s: summarise(v) for s, v in per_setting.items()}


def markdown_final(ref: Ref) -> str:
    """The paper-style table of one experiment's final.parquet (multi-seed re-evaluation)."""
    ex = experiment(ref)
    cells = _read_final(ex)
    if cells is None:
        raise UserError(
            f"{ex.results_dir / 'final.parquet'}: missing; "
            f"run `jal-search evaluate {ex.path}` first"
        )
    return _markdown([(ex.spec.loss, cells)], [s.name for s in ex.settings], None)


def compare(refs: Sequence[Ref], scope: str = "last", last_k: int = 3) -> str:
    """Rows = losses (one per experiment), columns = noise settings, cells = clean test accuracy
    (%) mean ± sample std over the seeds of results/final.parquet; an experiment without one
    shows its best search trial's test_acc, marked `(search, n=1)`."""
    if not refs:
        raise UserError("compare: give at least one experiment")
    rows, columns = [], []
    experiments = [with_trials(r) for r in refs]
    losses = [ex.spec.loss for ex in experiments]
    for ex in experiments:
        columns += [s.name for s in ex.settings if s.name not in columns]
        cells = _read_final(ex)
        if cells is None:
            chosen = select_best(trials_table(ex), epochs_table(ex), scope, last_k)
            cells = {
                name: Summary(s.test_acc, None, 1, 1, single_run=True) for name, s in chosen.items()
            }
        label = ex.spec.loss if losses.count(ex.spec.loss) == 1 else f"{ex.spec.loss} ({ex.name})"
        rows.append((label, cells))
    return _markdown(rows, columns, scope_label(scope, last_k))


def _markdown(
    rows: list[tuple[str, dict[str, Summary]]], columns: list[str], scope: str | None
) -> str:
    lines = [
        "| loss | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, cells in rows:
        lines.append(
            f"| {label} | "
            + " | ".join(cells[c].cell() if c in cells else "–" for c in columns)
            + " |"
        )
    note = (
        "\nClean test accuracy (%), mean ± sample std over n seeds of the best config per noise "
        f"setting (selected on {METRIC}; test accuracy never selects)."
    )
    if scope is not None and any(c.single_run for _, cells in rows for c in cells.values()):
        note += (
            f" `(search, n=1)`: no multi-seed evaluation yet — the best search trial's own test "
            f"accuracy (scope {scope})."
        )
    return "\n".join(lines) + "\n" + note
