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

Parents hold the spec (flattened params with dotted keys, and `spec.yaml`), the AMSE bound used
(`jal.a_min`, `jal.amse_bound`) and, once the setting is done, its best trial by last-epoch
val_acc (`search.best_trials`): params `best.<name>`, metrics `best_val_acc`, `best_test_acc`,
`best_epochs`, tag `jal.best_trial`; and the files under `<experiment>/results/` (tables, plots,
the multi-seed table) as artifacts under `results/`. Children hold the sampled params, per-epoch
METRICS, and tags for seed, noise, realised noise rate, label hash, validation-label mode, git
SHA and versions.

Status mapping (the exact status is always in the `jal.status` tag):
completed → FINISHED; stopped (by ASHA, a normal early end) → KILLED, so the UI tells it apart
from a full-budget trial; diverged / failed → FAILED; running → left RUNNING. A parent ends
FINISHED when its setting is done.

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
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from jal_search import experiment as exp
from jal_search import metrics
from jal_search.errors import UserError

METRICS = tuple(m.name for m in metrics.METRICS if m.tracked)  # logged per epoch
MLFLOW_STATUS = {
    "completed": "FINISHED",
    "stopped": "KILLED",
    "diverged": "FAILED",
    "failed": "FAILED",
}
SPEC_ARTIFACT = "spec.yaml"
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
        self._busy = threading.Lock()  # one MLflow caller at a time: the driver or the starter
        self._starter: threading.Thread | None = None

    # ---- live path: never raises -------------------------------------------------------------

    def start(self, manifest: dict[str, Any], background: bool = False) -> None:
        """Ensure the experiment and one parent run per noise setting.

        `background`: in a thread, so that a new store's set-up (seconds for SQLite's schema)
        overlaps the search's start; live results queue meanwhile, and `sync` waits for it.
        """
        self._manifest = manifest
        if background:
            self._starter = threading.Thread(
                target=self._live, args=(self._start_parents,), daemon=True
            )
            self._starter.start()
        else:
            self._live(self._start_parents)

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

    def _queue(self, setting: str, trial_id: str, params: dict[str, Any]) -> _Pending:
        pending = self._pending.setdefault(
            f"{setting}/{trial_id}", _Pending(setting, trial_id, dict(params))
        )
        pending.params = pending.params or dict(params)
        return pending

    def _live(self, action: Any) -> None:
        if time.monotonic() < self._retry_at:
            return  # in an outage: keep the backlog, try again later
        if not self._busy.acquire(blocking=False):
            return  # the background start is still at it: keep the backlog for the next call
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

        from jal_search.search import best_trials

        if self._starter is not None:
            self._starter.join()
        manifest = exp.read_manifest(path)
        self._manifest = manifest
        max_epochs = manifest["spec"]["budget"]["epochs"]
        best = {b.setting: b for b in best_trials(path)}
        report = SyncReport()
        try:
            with _mlflow_settings(SYNC_RETRIES):
                for entry in manifest["settings"]:
                    name, done = entry["name"], entry["status"] == "done"
                    self._complete_parent(entry, best.get(name) if done else None, done, report)
                    for record in exp.read_trials(path, name, entry.get("failures", {})):
                        status = record.status(max_epochs, done)
                        final = None if status == "running" else status
                        self._trial(
                            name,
                            record.trial_id,
                            record.config,
                            record.history,
                            final,
                            report,
                            failure=record.error,
                        )
                self._flush(report)  # results the live path saw that are not on disk yet
                self._publish_results(path / "results")
        except (MlflowException, OSError) as err:
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
        """Attach the search's tables, plots and summary (`jal-search results/report/evaluate`)
        to every parent, so each setting's view in the UI is complete; re-logging overwrites."""
        if folder.is_dir() and any(folder.iterdir()):
            for run in self._parents.values():
                self.client.log_artifacts(run.run_id, str(folder), "results")

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
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is None:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=_artifact_location(self.uri)
            )
        if found.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {self.experiment_name!r} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or track "
                "under another name"
            )
        return found.experiment_id

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
            run = self._create(setting, self._parent_tags(setting), _iso_ms(self.manifest))
            self._parents[setting] = run
            report.runs_created += 1
            report.params_logged += self._log(run, _flatten(self._spec()), {}, [])
            self._log_spec(run)
        return run

    def _complete_parent(
        self, entry: dict[str, Any], best: Any, done: bool, report: SyncReport
    ) -> None:
        """Everything a parent should hold: spec, best trial (done settings), final status."""
        run = self._parent(entry["name"], report)
        params = _flatten(self._spec())
        tags = self._parent_tags(entry["name"])
        metrics: list[Any] = []
        if best is not None:
            params.update(_flatten({"best": best.params}))
            tags["jal.best_trial"] = best.trial_id
            values = {"best_val_acc": best.val_acc, "best_test_acc": best.test_acc}
            values["best_epochs"] = best.epochs
            metrics = [_metric(k, v, 0, 0) for k, v in values.items() if k not in run.metric_keys]
        if done:
            tags["jal.status"] = "done"
        new_params = {k: v for k, v in params.items() if k not in run.params}
        new_tags = {k: v for k, v in tags.items() if run.tags.get(k) != v}
        report.params_logged += self._log(run, new_params, new_tags, metrics)
        if run.spec_logged is None:
            files = self.client.list_artifacts(run.run_id)
            run.spec_logged = any(f.path == SPEC_ARTIFACT for f in files)
        if not run.spec_logged:
            self._log_spec(run)
        if done and run.status != "FINISHED":
            self.client.set_terminated(run.run_id, "FINISHED")
            run.status = "FINISHED"
            report.runs_ended += 1

    def _log_spec(self, run: _Run) -> None:
        text = yaml.safe_dump(self._spec(), sort_keys=False)
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
    ) -> None:
        """Create or complete one child run: tags, missing params, missing steps, final status.

        `failure` is why a failed trial failed (the manifest's reason), kept as `jal.failure`.
        """
        parent = self._parent(setting, report)
        tags = self._child_tags(setting, trial_id, parent.run_id, results[0] if results else {})
        if status is not None:
            tags["jal.status"] = status
        if failure:
            tags["jal.failure"] = _clip(failure, MAX_TAG_LENGTH)
        key = f"{setting}/{trial_id}"
        run = self._children.get(key)
        if run is None:
            start = _result_ms(results[0]) if results else None
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
            step, ms = _step(result), _result_ms(result)
            for k in METRICS:
                if isinstance(result.get(k), int | float) and step not in run.steps[k]:
                    metrics.append(_metric(k, result[k], ms, step))
        new_params = {k: v for k, v in _flatten(params).items() if k not in run.params}
        new_tags = {k: v for k, v in tags.items() if run.tags.get(k) != v}
        report.params_logged += self._log(run, new_params, new_tags, metrics)
        report.metrics_logged += len(metrics)
        if status is not None and run.status != MLFLOW_STATUS[status]:
            end = _result_ms(results[-1]) if results else None
            self.client.set_terminated(run.run_id, MLFLOW_STATUS[status], end_time=end)
            run.status = MLFLOW_STATUS[status]
            report.runs_ended += 1

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
            "mlflow.note.content": spec.get("description") or None,
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
