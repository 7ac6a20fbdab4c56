"""MLflow tracking: one experiment per search, a parent run per noise setting, a child per trial.

Only the driver writes to MLflow; trials never import it. Two ways in, one layout:

- live: the driver's Tune callback calls `Tracker.on_result` / `on_trial_end`; one `log_batch`
  per result (params on the first, metrics with `step = epoch`);
- `Tracker.sync(path)`: rebuilds or completes MLflow from the trials' journals on disk, which
  are the source of truth. Idempotent: runs are found by tag before any is created, and only
  metric steps missing from each key's history are logged.

Run identity (tags): every run carries `jal.search` = "<name>@<created>" from the manifest, so a
new search that reuses a name gets new runs instead of merging into the old ones. Parents have
`jal.role = setting` and `jal.setting`; children `jal.role = trial`, `jal.trial =
"<setting>/<trial_id>"` and `mlflow.parentRunId`. One `search_runs` over the experiment recovers
them all after a restart; the first created wins should duplicates ever exist.

What a person sees in the UI: the experiment is marked as model training
(`mlflow.experimentKind`), so it opens on its runs table, and its description
(`mlflow.note.content`) says what the runs are, how the best is chosen and what to chart. Every
run carries `mlflow.source.*` and `mlflow.user`, and a description of its own.

Parents hold the spec (flattened params with dotted keys, and `spec.yaml` without unset fields),
the AMSE bound used (`jal.a_min`, `jal.amse_bound`) and, once the setting is done, its best trial
by last-epoch val_acc (`results.rank`; ties go to more epochs, then the smaller trial id):
params `best.<name>`, metrics `best_val_acc`, `best_test_acc`, `best_epochs` and
`best_val_acc_clean_est/lo/hi`, tag `jal.best_trial`, a description naming any tie; and the
setting's own tables, plots and summary (`report.write_setting_report`) under `results/`, logged
as the setting ends (live: when its last trial ends in a run that started it; else the next sync).
Files the user made for the whole search (`jal-search report/results/evaluate`) go to every parent
under `search/`. Children hold the sampled params, per-epoch METRICS (timestamps: the journal's),
tags for seed, noise, realised noise rate, label hash, validation-label mode, git SHA and
versions, and start when the trial started (its journal's header) and end at its last epoch. The
best child is tagged `jal.best=true`.

Status mapping (the exact status is always in the `jal.status` tag, and the run's description
says it in words, e.g. "stopped by ASHA at epoch 1 (rung 1 of 2)"):
completed → FINISHED; stopped (by ASHA, a normal early end) → FINISHED too, as Ray's own MLflow
callback does, so it is not drawn as a crash; diverged / failed → FAILED; running → left RUNNING.
A parent ends FINISHED when its setting is done.

Outage: a live call that fails never raises into Tune. The tracker warns once per outage (one
line on stderr), sets `behind`, keeps the unconfirmed results in memory and retries at most every
`retry_seconds`; the first call that succeeds pushes the backlog. After a failed call the runs
are re-read from MLflow before more is logged, because a call that timed out may have landed.
`sync` clears `behind`. Live calls use short HTTP retries (MLflow's default retries for ~4 minutes
per call, which would stall the driver); variables the user set are respected.

Secrets: MLflow reads MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN itself; the tracker never logs
them, removes user:password from URIs in the spec before logging it, and scrubs them from
messages. Only `MlflowClient` is used: no global tracking URI, no active run, no autolog.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from jal_search import experiment as exp
from jal_search import metrics
from jal_search.errors import UserError
from jal_search.journal import read_journal

if TYPE_CHECKING:
    from jal_search.results import Experiment, Selection, Setting

METRICS = tuple(m.name for m in metrics.METRICS if m.tracked)  # logged per epoch
MLFLOW_STATUS = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "diverged": "FAILED",
    "failed": "FAILED",
}
SPEC_ARTIFACT = "spec.yaml"
SCHEDULER_NAMES = {
    "asha": "ASHA",
    "successive_halving": "successive halving",
    "paused_halving": "paused halving",
}
BEST_CLEAN = ("best_val_acc_clean_est", "best_val_acc_clean_lo", "best_val_acc_clean_hi")
RESULTS_ARTIFACTS, SEARCH_ARTIFACTS = "results", "search"  # a setting's own; the whole search's
# The UI opens an experiment of this kind on its runs table (not the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CHARTS = (
    "Charts: train_loss is not comparable across trials (AMSE adds β(a²−2a)/K, which grows with "
    "a): compare val_acc, val_acc_clean_est and noisy_fit instead. In Compare → Parallel "
    "coordinates, choose the params alpha, beta, a (log-uniform: read them on a log scale) and "
    "the metric val_acc; MLflow keeps that choice in the browser, it cannot be set when logging."
)
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# MLflow's limits (mlflow.utils.validation): per log_batch call, and value lengths.
MAX_PARAMS_TAGS, MAX_ENTITIES = 100, 1000
MAX_PARAM_LENGTH, MAX_TAG_LENGTH = 6000, 8000
LIVE_RETRIES, SYNC_RETRIES = 1, 2


def default_tracking_uri(experiment_path: Path) -> str:
    """One SQLite file per storage path, next to the experiments, holding all of their searches."""
    return f"sqlite:///{Path(experiment_path).resolve().parent / 'mlflow.db'}"


def check_multi_node(uri: str, nodes: int) -> None:
    """Refuse a file-based store (file://, a plain path, SQLite) on a multi-node cluster."""
    scheme = urlsplit(uri).scheme.lower()
    local = scheme == "file" or scheme.startswith("sqlite") or (not scheme and uri != "databricks")
    if nodes > 1 and local:
        raise UserError(
            f"tracking_uri: {redact_uri(uri)!r} is a file on one machine but the cluster has "
            f"{nodes} nodes: the other nodes, and a driver restarted on another node or pod, "
            "cannot see it; run an MLflow server and pass --tracking-uri http://HOST:5000"
        )


def redact_uri(uri: str) -> str:
    """The URI with any user:password replaced by ***."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@dataclass
class SyncReport:
    runs_created: int = 0
    params_logged: int = 0
    metrics_logged: int = 0  # metric points (one key at one step)
    runs_ended: int = 0

    def __str__(self) -> str:
        return (
            f"mlflow sync: {self.runs_created} runs created, {self.params_logged} params and "
            f"{self.metrics_logged} metric points logged, {self.runs_ended} runs ended"
        )


@dataclass
class _Run:
    """What the tracker knows of one MLflow run."""

    run_id: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metric_keys: set[str]  # keys with at least one point
    steps: dict[str, set[int]] | None = None  # per-key steps in MLflow; None until read
    spec_logged: bool | None = None  # parents: spec.yaml present; None until checked


@dataclass
class _Pending:
    """What the live path has seen of one trial but not yet confirmed in MLflow."""

    setting: str
    trial_id: str
    params: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    status: str | None = None


class Tracker:
    """Writes one search to MLflow from the driver; see the module docstring for the layout."""

    def __init__(self, uri: str, experiment_name: str, retry_seconds: float = 30.0) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        self.retry_seconds = retry_seconds
        self.behind = False
        self._client: Any = None
        self._manifest: dict[str, Any] | None = None
        self._experiment_id: str | None = None
        self._indexed = False
        self._parents: dict[str, _Run] = {}  # setting → run
        self._children: dict[str, _Run] = {}  # "<setting>/<trial_id>" → run
        self._pending: dict[str, _Pending] = {}
        self._retry_at = 0.0
        self._warned = False
        self._busy = threading.Lock()  # one MLflow caller at a time: the driver or a background one
        self._background: list[
            threading.Thread
        ] = []  # the start, settings' ends: `wait` joins them
        self._path: Path | None = None  # the experiment folder: journals, and settings' reports
        self._ended: dict[str, dict[str, str]] = {}  # live: setting → {trial id: status}

    # ---- live path: never raises -------------------------------------------------------------

    def start(
        self, manifest: dict[str, Any], background: bool = False, path: Path | None = None
    ) -> None:
        """Ensure the experiment and one parent run per noise setting.

        `background`: in a thread, so that a new store's set-up (seconds for SQLite's schema)
        overlaps the search's start; live results queue meanwhile, and `wait` joins it.
        `path`: the experiment folder, where runs take their times from the trials' journals and
        each setting's report is made as it ends (in the background, like the start: its plots
        take a second, which the search's loop would otherwise stand still for).
        """
        self._manifest = manifest
        self._path = path
        self._background_if(background, self._start_parents)

    def on_result(
        self, setting: str, trial_id: str, params: dict[str, Any], result: dict[str, Any]
    ) -> None:
        """Log one epoch's result: the child run is created on the trial's first result."""
        self._queue(setting, trial_id, params).results.append(result)
        self._live(self._flush)

    def on_trial_end(self, setting: str, trial_id: str, status: str) -> None:
        """Set the child's `jal.status` tag and end it (see the status mapping above).

        An unknown status is a bug in the caller and raises ValueError.
        """
        if status not in MLFLOW_STATUS:
            raise ValueError(f"status {status!r}: expected one of {sorted(MLFLOW_STATUS)}")
        self._queue(setting, trial_id, {}).status = status
        self._live(self._flush)
        ended = self._ended.setdefault(setting, {})
        ended[trial_id] = status
        if self._path is not None and len(ended) == int(self._setting(setting)["trials"]):
            self._background_if(True, lambda: self._finish_live(setting))

    def wait(self) -> None:
        """Until what the live path runs in the background (the start, settings' ends) is done."""
        while self._background:
            self._background.pop(0).join()

    def _background_if(self, background: bool, action: Callable[[], None]) -> None:
        """`action` on the live path: in a thread of its own that waits its turn at MLflow
        (`wait` joins it), or now, unless another MLflow call is under way."""
        if not background:
            self._live(action)
            return
        thread = threading.Thread(target=self._live, args=(action, True), daemon=True)
        thread.start()
        self._background.append(thread)

    def _finish_live(self, setting: str) -> None:
        """The setting's last trial has ended: its best trial and report, its parent ended.

        The manifest marks it done only when the whole search ends; here it is read as done,
        with the failures this tracker saw (their reasons reach MLflow at that end's sync).
        """
        from jal_search import results

        assert self._path is not None
        ex = results.load_experiment(self._path)
        ended = self._ended[setting]
        settings = []
        for s in ex.settings:
            if s.name == setting:
                trials = [
                    dataclasses.replace(r, error=r.error or "the reason reaches MLflow at the end")
                    if ended.get(r.trial_id) == "failed"
                    else r
                    for r in s.trials
                ]
                s = dataclasses.replace(s, status="done", trials=trials)
            settings.append(s)
        ex = dataclasses.replace(ex, settings=settings)
        self._complete_setting(ex, setting, SyncReport())
        # Its trials as their journals have them, final: what the live path still queued for
        # them (skipped while another call was at MLflow) would only undo their best tag.
        for key in [k for k in list(self._pending) if k.startswith(f"{setting}/")]:
            self._pending.pop(key, None)

    def _queue(self, setting: str, trial_id: str, params: dict[str, Any]) -> _Pending:
        pending = self._pending.setdefault(
            f"{setting}/{trial_id}", _Pending(setting, trial_id, dict(params))
        )
        pending.params = pending.params or dict(params)
        return pending

    def _live(self, action: Callable[[], None], queue: bool = False) -> None:
        """Run `action` now; on an MLflow failure warn once and keep the backlog for later.
        `queue`: wait for an MLflow call under way rather than leave it to the next call."""
        if time.monotonic() < self._retry_at:
            return  # in an outage: keep the backlog, try again later
        if not self._busy.acquire(blocking=queue):
            return  # a background call is at it: keep the backlog for the next call
        try:
            with _mlflow_settings(LIVE_RETRIES):
                action()
        except Exception as err:  # noqa: BLE001 - an MLflow problem must never fail a trial
            self.behind = True
            self._retry_at = time.monotonic() + self.retry_seconds
            self._forget()
            if not self._warned:
                self._warned = True
                print(
                    f"warning: MLflow at {redact_uri(self.uri)} failed ({self._scrub(err)}); "
                    "trials go on and their results stay on disk; the driver syncs after each "
                    "setting, or run `jal-search sync EXPERIMENT` later",
                    file=sys.stderr,
                    flush=True,
                )
        else:
            self._warned = False
        finally:
            self._busy.release()

    def _start_parents(self) -> None:
        for entry in self.manifest["settings"]:
            self._parent(entry["name"], SyncReport())

    def _flush(self, report: SyncReport | None = None) -> None:
        report = report or SyncReport()
        for key, p in list(self._pending.items()):
            self._trial(p.setting, p.trial_id, p.params, p.results, p.status, report)
            del self._pending[key]

    # ---- sync from disk ----------------------------------------------------------------------

    def sync(self, path: Path) -> SyncReport:
        """Make MLflow match the experiment on disk; raises UserError if MLflow is unreachable.

        Then records `mlflow_runs` ({setting: {trial_id: run_id}}) in the manifest for the results
        tables. The caller holds the experiment's lock (the driver does while it runs).
        """
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        from jal_search import results

        self.wait()
        ex = results.load_experiment(path)
        self._manifest, self._path = ex.manifest, path
        report = SyncReport()
        try:
            with _mlflow_settings(SYNC_RETRIES):
                # What the live path queued first: a setting's completion below then has the
                # last word on its children (which one is the best, their final status).
                self._flush(report)
                for s in ex.settings:
                    if s.status == "done":
                        self._complete_setting(ex, s.name, report)
                        continue
                    self._complete_parent(s.name, {}, {}, [], report)
                    for record in s.trials:
                        self._record(s.name, record, False, report)
                self._publish_results(path / results.RESULTS_DIR)
        except (MlflowException, OSError, SQLAlchemyError) as err:  # a store MLflow cannot open
            self.behind = True
            self._forget()
            raise UserError(
                f"MLflow sync to {redact_uri(self.uri)} failed ({self._scrub(err)}); check the "
                f"server and --tracking-uri, then run `jal-search sync {path}` again"
            ) from None
        self.behind, self._warned, self._retry_at = False, False, 0.0
        self._record_run_ids(path)
        return report

    def _publish_results(self, folder: Path) -> None:
        """Attach what the user made of the whole search (`jal-search results/report/evaluate`:
        tables, plots, the multi-seed table) to every parent; re-logging overwrites."""
        if folder.is_dir() and any(folder.iterdir()):
            for run in self._parents.values():
                self.client.log_artifacts(run.run_id, str(folder), SEARCH_ARTIFACTS)

    def _record_run_ids(self, path: Path) -> None:
        runs: dict[str, dict[str, str]] = {}
        for key, run in self._children.items():
            setting, trial_id = key.split("/", 1)
            runs.setdefault(setting, {})[trial_id] = run.run_id
        manifest = exp.read_manifest(path)
        if manifest.get("mlflow_runs") != runs:
            manifest["mlflow_runs"] = runs
            exp.write_json_atomic(path / exp.MANIFEST, manifest)

    # ---- runs --------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            _create_sqlite_whole(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _forget(self) -> None:
        """After a failed call: re-read runs from MLflow before creating or logging anything."""
        self._indexed = False
        self._parents.clear()
        self._children.clear()

    def _index(self) -> None:
        """Find the experiment (create it if missing) and this search's runs."""
        if self._indexed:
            return
        if self._experiment_id is None:
            self._experiment_id = self._experiment()
        search = _search_id(self.manifest)
        token = None
        while True:
            page = self.client.search_runs(
                [self._experiment_id],
                filter_string=f"tags.`jal.search` = '{search}'",
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            for run in page:
                tags = run.data.tags
                known = _Run(
                    run.info.run_id,
                    run.info.status,
                    dict(run.data.params),
                    dict(tags),
                    set(run.data.metrics),
                )
                if tags.get("jal.role") == "setting":
                    self._parents.setdefault(tags.get("jal.setting", ""), known)
                elif tags.get("jal.role") == "trial":
                    self._children.setdefault(tags.get("jal.trial", ""), known)
            token = page.token
            if not token:
                break
        self._indexed = True

    def _experiment(self) -> str:
        """The experiment's id, created if missing, with its kind and description."""
        tags = {**EXPERIMENT_KIND, "mlflow.note.content": self._experiment_note()}
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is None:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=_artifact_location(self.uri), tags=tags
            )
        if found.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {self.experiment_name!r} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or track "
                "under another name"
            )
        for key, value in tags.items():
            if found.tags.get(key) != value:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def _experiment_note(self) -> str:
        from jal_search.results import TIE_RULE

        spec = self.manifest["spec"]
        noise = ", ".join(s["name"] for s in self.manifest["settings"])
        return _clip(
            f"jal-search: {spec['loss']} on {spec['dataset']}, noise settings {noise}. One parent "
            "run per noise setting (its best trial, tables and plots under results/), a child "
            "run per trial nested under it. Status: FINISHED with jal.status=stopped is a trial "
            "ASHA ended early (normal); FAILED is an error or a diverged loss. The best trial of "
            f"a setting has the highest val_acc at its last epoch ({TIE_RULE}) and the tag "
            f"jal.best=true. val_acc is scored on {spec.get('val_labels', 'noisy')} validation "
            "labels; val_acc_clean_est estimates it on clean labels (95% interval: _lo, _hi). "
            f"{CHARTS}",
            MAX_TAG_LENGTH,
        )

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            raise RuntimeError("Tracker.start(manifest) or Tracker.sync(path) must come first")
        return self._manifest

    def _setting(self, name: str) -> dict[str, Any]:
        for entry in self.manifest["settings"]:
            if entry["name"] == name:
                return entry
        raise KeyError(f"noise setting {name!r} is not in the manifest")

    def _create(self, name: str, tags: dict[str, str], start_ms: int | None) -> _Run:
        run = self.client.create_run(
            self._experiment_id, start_time=start_ms, tags=tags, run_name=name
        )
        steps: dict[str, set[int]] = {key: set() for key in METRICS}
        return _Run(run.info.run_id, run.info.status, {}, dict(run.data.tags), set(), steps, False)

    def _parent(self, setting: str, report: SyncReport) -> _Run:
        """The setting's parent run, created with its tags, spec params and spec artifact."""
        self._index()
        run = self._parents.get(setting)
        if run is None:
            tags = self._parent_tags(setting)
            tags["mlflow.note.content"] = self._parent_note(setting, "trials still to run")
            run = self._create(setting, tags, _iso_ms(self.manifest))
            self._parents[setting] = run
            report.runs_created += 1
            report.params_logged += self._log(run, _flatten(self._spec()), {}, [])
            self._log_spec(run)
        return run

    def _complete_parent(
        self,
        setting: str,
        params: dict[str, str],
        tags: dict[str, str],
        metrics: list[Any],
        report: SyncReport,
    ) -> _Run:
        """The parent with its spec, tags, description and spec.yaml, plus `params`, `tags` and
        `metrics` (a done setting's best trial); only what MLflow lacks is sent."""
        run = self._parent(setting, report)
        params = {**_flatten(self._spec()), **params}
        tags = {**self._parent_tags(setting), **tags}
        tags.setdefault("mlflow.note.content", self._parent_note(setting, "trials still to run"))
        new_params = {k: v for k, v in params.items() if k not in run.params}
        new_tags = {k: v for k, v in tags.items() if run.tags.get(k) != v}
        report.params_logged += self._log(run, new_params, new_tags, metrics)
        if run.spec_logged is None:
            files = self.client.list_artifacts(run.run_id)
            run.spec_logged = any(f.path == SPEC_ARTIFACT for f in files)
        if not run.spec_logged:
            self._log_spec(run)
        return run

    def _complete_setting(self, ex: Experiment, setting: str, report: SyncReport) -> None:
        """A done setting: every child with its final status (the best one tagged and described
        as such), the parent with the best trial and the setting's report, then ended."""
        from jal_search import results

        s = next(s for s in ex.settings if s.name == setting)
        one = dataclasses.replace(ex, settings=[s])
        ranked = results.rank(results.trials_table(one), results.epochs_table(one))[setting]
        best = ranked[0] if ranked else None
        ties = [c.trial_id for c in ranked if best and c.val_acc == best.val_acc]
        tie = (
            f" {len(ties)} trials tie at val_acc {best.val_acc:.4f} ({', '.join(ties)}): "
            f"{results.TIE_RULE}."
            if best and len(ties) > 1
            else ""
        )
        note = (
            f"Best trial of {setting} by val_acc at its last epoch ({ex.spec.val_labels} "
            f"validation labels).{tie}"
        )
        for record in s.trials:
            winner = best is not None and record.trial_id == best.trial_id
            self._record(setting, record, True, report, note if winner else None)
        params: dict[str, str] = {}
        tags = {"jal.status": "done"}
        metrics: list[Any] = []
        run = self._parent(setting, report)
        if best is not None:
            params = _flatten({"best": best.params})
            tags["jal.best_trial"] = best.trial_id
            if run.tags.get("jal.best_trial") != best.trial_id:  # new, or another after extend
                now = int(time.time() * 1000)
                values = {
                    "best_val_acc": best.val_acc,
                    "best_test_acc": best.test_acc,
                    "best_epochs": best.epochs,
                    **dict(zip(BEST_CLEAN, best.clean, strict=True)),
                }
                metrics = [_metric(k, v, now, 0) for k, v in values.items() if math.isfinite(v)]
        tags["mlflow.note.content"] = self._parent_note(setting, _outcome(s, ex, best, tie))
        run = self._complete_parent(setting, params, tags, metrics, report)
        self._log_report(ex, setting, run)
        if run.status != "FINISHED":
            self.client.set_terminated(run.run_id, "FINISHED")
            run.status = "FINISHED"
            report.runs_ended += 1

    def _log_report(self, ex: Experiment, setting: str, run: _Run) -> None:
        """The setting's own tables, plots and summary under `results/`, made and logged again
        only when its trials changed (the tag `jal.report` holds what they were)."""
        from jal_search.report import write_setting_report

        s = next(s for s in ex.settings if s.name == setting)
        if not s.trials:
            return
        max_epochs = ex.spec.budget.epochs
        state = [
            (r.trial_id, len(r.history), r.status(max_epochs, True), r.error) for r in s.trials
        ]
        digest = hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]
        if run.tags.get("jal.report") == digest:
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_setting_report(ex, setting, Path(tmp))
            self.client.log_artifacts(run.run_id, tmp, RESULTS_ARTIFACTS)
        self._log(run, {}, {"jal.report": digest}, [])

    def _record(
        self,
        setting: str,
        record: exp.TrialRecord,
        done: bool,
        report: SyncReport,
        best: str | None = None,
    ) -> None:
        """One trial as its journal has it: `_trial` with its final status (None: running)."""
        status = record.status(self.manifest["spec"]["budget"]["epochs"], done)
        final = None if status == "running" else status
        self._trial(
            setting,
            record.trial_id,
            record.config,
            record.history,
            final,
            report,
            failure=record.error,
            best=best,
        )

    def _parent_note(self, setting: str, outcome: str) -> str:
        """A parent's description: the spec's own, what the setting is, how it turned out."""
        description = self.manifest["spec"].get("description")
        entry = self._setting(setting)
        bound = f" AMSE's bound a_min = {entry['a_min']:.3g}." if entry.get("a_min") else ""
        text = f"Noise setting {setting}: {outcome}.{bound} {CHARTS}"
        return _clip(f"{description}\n\n{text}" if description else text, MAX_TAG_LENGTH)

    def _log_spec(self, run: _Run) -> None:
        text = yaml.safe_dump(_compact(self._spec()), sort_keys=False)
        self.client.log_text(run.run_id, text, SPEC_ARTIFACT)
        run.spec_logged = True

    def _trial(
        self,
        setting: str,
        trial_id: str,
        params: dict[str, Any],
        results: list[dict[str, Any]],
        status: str | None,
        report: SyncReport,
        failure: str | None = None,
        best: str | None = None,
    ) -> None:
        """Create or complete one child run: tags, missing params, missing steps, final status.

        `failure` is why a failed trial failed (the manifest's reason), kept as `jal.failure`;
        `best` says why the trial is its setting's best (None: it is not).
        """
        parent = self._parent(setting, report)
        tags = self._child_tags(setting, trial_id, parent.run_id, results[0] if results else {})
        if status is not None:
            tags["jal.status"] = status
        if failure:
            tags["jal.failure"] = _clip(failure, MAX_TAG_LENGTH)
        if best:
            tags["jal.best"] = "true"
        started, stamps = self._journal_times(setting, trial_id)
        key = f"{setting}/{trial_id}"
        run = self._children.get(key)
        if run is None:
            start = started or (_result_ms(results[0]) if results else None)
            run = self._children[key] = self._create(trial_id, tags, start)
            report.runs_created += 1
        if run.steps is None:
            run.steps = {
                k: {m.step for m in self.client.get_metric_history(run.run_id, k)}
                if k in run.metric_keys
                else set()
                for k in METRICS
            }
        metrics = []
        for result in results:
            step = _step(result)
            ms = stamps.get(step) or _result_ms(result)
            for k in METRICS:
                if isinstance(result.get(k), int | float) and step not in run.steps[k]:
                    metrics.append(_metric(k, result[k], ms, step))
        if status is not None:
            steps = [m.step for m in metrics] + [s for v in run.steps.values() for s in v]
            note = _child_note(status, max(steps, default=0), failure, self.manifest["spec"])
            tags["mlflow.note.content"] = _clip(f"{best} {note}" if best else note, MAX_TAG_LENGTH)
        new_params = {k: v for k, v in _flatten(params).items() if k not in run.params}
        new_tags = {k: v for k, v in tags.items() if run.tags.get(k) != v}
        report.params_logged += self._log(run, new_params, new_tags, metrics)
        report.metrics_logged += len(metrics)
        if not best and "jal.best" in run.tags:  # no longer the best (`extend` found a better)
            self.client.delete_tag(run.run_id, "jal.best")
            del run.tags["jal.best"]
        if status is not None and run.status != MLFLOW_STATUS[status]:
            end = max(stamps.values(), default=None) or (
                _result_ms(results[-1]) if results else None
            )
            self.client.set_terminated(run.run_id, MLFLOW_STATUS[status], end_time=end)
            run.status = MLFLOW_STATUS[status]
            report.runs_ended += 1

    def _journal_times(self, setting: str, trial_id: str) -> tuple[int | None, dict[int, int]]:
        """When the trial started and each epoch ended (ms), from its journal: exact on the live
        path too, where Tune's result timestamps are whole seconds. Nothing without a journal."""
        if self._path is None:
            return None, {}
        header, rows = read_journal(self._path / setting / trial_id)
        stamps = {
            int(r["epoch"]): int(r["timestamp"] * 1000)
            for r in rows
            if isinstance(r.get("timestamp"), int | float)
        }
        started = (header or {}).get("started")
        if not isinstance(started, int | float) and rows and 1 in stamps:
            # a journal without `started` (older versions): the first epoch's end less its time
            started = stamps[1] / 1000 - float(rows[0].get("epoch_seconds", 0.0))
        return (int(started * 1000) if isinstance(started, int | float) else None), stamps

    def _log(self, run: _Run, params: dict[str, str], tags: dict[str, str], metrics: list) -> int:
        """Send params, tags and metrics in as few `log_batch` calls as MLflow's limits allow."""
        from mlflow.entities import Param, RunTag

        param_list = [Param(k, v) for k, v in params.items()]
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        while param_list or tag_list or metrics:
            p, param_list = param_list[:MAX_PARAMS_TAGS], param_list[MAX_PARAMS_TAGS:]
            t, tag_list = tag_list[:MAX_PARAMS_TAGS], tag_list[MAX_PARAMS_TAGS:]
            room = MAX_ENTITIES - len(p) - len(t)
            m, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(run.run_id, metrics=m, params=p, tags=t, synchronous=True)
            run.params.update((x.key, x.value) for x in p)
            run.tags.update((x.key, x.value) for x in t)
            for x in m:
                run.metric_keys.add(x.key)
                if run.steps is not None:
                    run.steps.setdefault(x.key, set()).add(x.step)
        return len(params)

    # ---- what runs carry ---------------------------------------------------------------------

    def _spec(self) -> dict[str, Any]:
        """The spec as logged: URIs without credentials."""
        spec = dict(self.manifest["spec"])
        if spec.get("tracking_uri"):
            spec["tracking_uri"] = redact_uri(spec["tracking_uri"])
        return spec

    def _common_tags(self, setting: str) -> dict[str, str]:
        manifest = self.manifest
        entry = self._setting(setting)
        tags = {
            "jal.search": _search_id(manifest),
            "jal.experiment": manifest["name"],
            "jal.setting": setting,
            "jal.noise_type": entry.get("type"),
            "jal.noise_rate": entry.get("rate"),
            "jal.git_sha": manifest.get("git_sha"),
            **{f"jal.version.{k}": v for k, v in manifest.get("versions", {}).items()},
            # the UI's Source and Created by columns
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"jal-search run {manifest.get('spec_source', '')}".strip(),
            "mlflow.source.git.commit": manifest.get("git_sha"),
            "mlflow.user": _user(),
        }
        return {k: _clip(str(v), MAX_TAG_LENGTH) for k, v in tags.items() if v is not None}

    def _parent_tags(self, setting: str) -> dict[str, str]:
        spec, entry = self.manifest["spec"], self._setting(setting)
        extra = {
            "jal.role": "setting",
            "jal.loss": spec.get("loss"),
            "jal.dataset": spec.get("dataset"),
            "jal.a_min": entry.get("a_min"),
            "jal.amse_bound": entry.get("amse_bound"),
        }
        extra = {k: _clip(str(v), MAX_TAG_LENGTH) for k, v in extra.items() if v is not None}
        return {**self._common_tags(setting), **extra}

    def _child_tags(
        self, setting: str, trial_id: str, parent_id: str, first: dict[str, Any]
    ) -> dict[str, str]:
        spec = self.manifest["spec"]
        extra = {
            "mlflow.parentRunId": parent_id,
            "jal.role": "trial",
            "jal.trial": f"{setting}/{trial_id}",
            "jal.seed": spec.get("seed"),
            "jal.val_labels": spec.get("val_labels"),
            "jal.noise_realised": first.get("noise_realised"),
            "jal.label_hash": first.get("label_hash"),
        }
        extra = {k: str(v) for k, v in extra.items() if v is not None}
        return {**self._common_tags(setting), **extra}

    def _scrub(self, err: BaseException) -> str:
        """One line of an error, without credentials from the URI or the environment."""
        text = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        secrets = [os.environ.get(name) for name in SECRET_VARIABLES]
        netloc = urlsplit(self.uri).netloc
        if "@" in netloc:
            secrets.append(netloc.rsplit("@", 1)[0])
        for secret in filter(None, secrets):
            text = text.replace(secret, "***")
        return text


def _search_id(manifest: dict[str, Any]) -> str:
    return f"{manifest['name']}@{manifest.get('created', '')}"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; None and empty dicts dropped; values as MLflow param strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{prefix}{key}"] = _clip(text, MAX_PARAM_LENGTH)
    return out


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _metric(key: str, value: float, ms: int, step: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key, float(value), ms, step)


def _step(result: dict[str, Any]) -> int:
    """The epoch (1-based), which Tune also counts as training_iteration."""
    return int(result.get("epoch", result.get("training_iteration", 0)))


def _result_ms(result: dict[str, Any]) -> int:
    """Tune's result timestamp (seconds) in ms: the same on the live path and in a sync."""
    return int(result.get("timestamp", time.time()) * 1000)


def _iso_ms(manifest: dict[str, Any]) -> int | None:
    created = manifest.get("created")
    return int(dt.datetime.fromisoformat(created).timestamp() * 1000) if created else None


def _create_sqlite_whole(uri: str) -> None:
    """Create a new SQLite store whole or not at all. MLflow builds its schema in steps (alembic
    migrations, seconds of them), and a driver killed among them left a file that every later
    run failed to open ("index ... already exists"). The schema is built in a file of its own,
    then linked into place — unless another search got there first."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=db.parent, prefix=".mlflow-db-") as folder:
        fresh = Path(folder) / db.name
        MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments(max_results=1)
        with contextlib.suppress(FileExistsError):
            os.link(fresh, db)


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts next to the DB (MLflow would use ./mlruns in the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def _mlflow_settings(retries: int) -> Iterator[None]:
    """Bound how long one MLflow HTTP call may block, and stop MLflow printing a "View run" line
    (plus an extra request) for every run it ends. Only variables the user has not set change;
    MLflow reads them at call time, and one thread at a time calls MLflow (`Tracker._busy`).
    """
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    added = {k: v for k, v in limits.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (e.g. in a container)
        return None


def _compact(data: Any) -> Any:
    """`data` without None values and the mappings they empty: only what the user set."""
    if not isinstance(data, dict):
        return data
    kept = {k: _compact(v) for k, v in data.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {}}


def _child_note(status: str, epochs: int, failure: str | None, spec: dict[str, Any]) -> str:
    """A child's description: how the trial ended, in words."""
    budget = spec["budget"]["epochs"]
    if status == "completed":
        return f"Completed all {budget} epochs."
    if status == "diverged":
        return f"Diverged at epoch {epochs}: the training loss was not finite (FAILED)."
    if status == "failed":
        return f"Failed after {epochs} epoch{'' if epochs == 1 else 's'}: {failure or 'error'}."
    from jal_search.spec import Scheduler

    scheduler = Scheduler(**(spec.get("scheduler") or {}))
    rungs = scheduler.rungs(budget)
    if epochs in rungs:
        return (
            f"Stopped by {SCHEDULER_NAMES[scheduler.type]} at epoch {epochs} "
            f"(rung {rungs.index(epochs) + 1} of {len(rungs)}): "
            "it trailed the setting's other trials there. A normal early end, not a failure; "
            f"its val_acc is from epoch {epochs} of {budget}."
        )
    return f"Stopped early at epoch {epochs} of {budget}."


def _outcome(s: Setting, ex: Experiment, best: Selection | None, tie: str) -> str:
    """How a done setting turned out, for its parent's description."""
    from jal_search.results import clean_text

    statuses = [r.status(ex.spec.budget.epochs, True) for r in s.trials]
    counts = ", ".join(f"{statuses.count(x)} {x}" for x in exp.STATUSES if x in statuses)
    text = f"{len(statuses)} trials ({counts})"
    if best is None:
        return f"{text}; no eligible trial (all failed or diverged)"
    return (
        f"{text}. Best: {best.trial_id} (tag jal.best=true), val_acc {best.val_acc:.4f} on "
        f"{ex.spec.val_labels} validation labels at its last epoch ({best.epochs}), estimated "
        f"clean val_acc {clean_text(best.clean)}, test_acc {best.test_acc:.4f}.{tie}"
    )
