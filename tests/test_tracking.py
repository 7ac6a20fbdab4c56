"""MLflow tracking against a real `mlflow server` (SQLite backend, 127.0.0.1), started once per
module and restarted on the same port and database to simulate an outage.

Experiments are fabricated on disk without Ray (tests/fabricate.py), so every expected param,
tag and metric point below comes from the fabricated trials, never from MLflow itself.
"""

import json
import math
import os
import secrets
import time

import pytest
import yaml
from fabricate import STARTED, FakeTrial, fabricate
from mlflow import MlflowClient
from mlflow_server import MlflowServer, free_port

from jal_search import experiment as exp
from jal_search.errors import UserError
from jal_search.tracking import (
    METRICS,
    Tracker,
    check_multi_node,
    default_tracking_uri,
)

# MLflow's SQLite store triggers a SQLAlchemy deprecation warning that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

SYM, ASYM = "symmetric-0.4", "asymmetric-0.2"
EPOCHS = 4  # fabricate's budget
# A trial ASHA stopped ended normally: FINISHED, as Ray's own MLflow callback ends it.
MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "diverged": "FAILED"}
MLFLOW_STATUS["failed"] = "FAILED"
# fabricate's scheduler: ASHA, grace 1, reduction factor 2, 4 epochs: rungs at epochs 1 and 2
NOTES = {
    "completed": "Completed all 4 epochs.",
    "stopped": "Stopped by ASHA at epoch 2 (rung 2 of 2)",
    "diverged": "Diverged at epoch 3",
    "failed": "Failed after 1 epoch: RuntimeError: boom",
}


def p(a: float, alpha: float = 1.0, beta: float = 1.0) -> dict[str, float]:
    return {"alpha": alpha, "beta": beta, "a": a}


TRIALS = {
    SYM: [
        FakeTrial("a0000001", p(10.0, 2.0, 0.5), [0.50, 0.60, 0.70, 0.80]),  # completed
        FakeTrial("b0000002", p(20.0, 3.0, 0.7), [0.60, 0.65]),  # stopped by ASHA
        FakeTrial("c0000003", p(30.0, 4.0, 0.9), [0.90, 0.95, 0.99], diverged=True),
        FakeTrial("d0000004", p(40.0, 5.0, 1.1), [0.97], error="RuntimeError: boom"),
    ],
    ASYM: [
        FakeTrial("e0000005", p(11.0, 6.0, 1.3), [0.55, 0.65, 0.75, 0.85]),
        FakeTrial("f0000006", p(12.0, 7.0, 1.5), [0.88, 0.91]),  # stopped, best last val_acc
    ],
}


def status(fake: FakeTrial) -> str:
    if fake.error:
        return "failed"
    if fake.diverged:
        return "diverged"
    return "completed" if len(fake.val_acc) == EPOCHS else "stopped"


def best(fakes: list[FakeTrial]) -> FakeTrial:
    """Highest last-epoch val_acc among trials that neither failed nor diverged."""
    eligible = [f for f in fakes if status(f) in ("completed", "stopped")]
    return max(eligible, key=lambda f: f.val_acc[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    seconds = srv.start()
    print(f"mlflow server started in {seconds:.1f} s")
    yield srv
    srv.stop()


def runs_by_name(client: MlflowClient, experiment: str) -> dict[str, object]:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"duplicate runs: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def assert_histories_match_disk(client, runs, trials: dict[str, list[FakeTrial]]) -> None:
    """Each metric of each child holds exactly the fabricated epochs: steps and values."""
    for setting, fakes in trials.items():
        for fake in fakes:
            rows = fake.rows(setting)
            for key in METRICS:
                got = points(client, runs[fake.trial_id].info.run_id, key)
                want = [(int(row["epoch"]), row[key]) for row in rows]
                assert [s for s, _ in got] == [s for s, _ in want], (fake.trial_id, key)
                assert all(same(g, w) for (_, g), (_, w) in zip(got, want, strict=True))


def test_sync_builds_the_nested_layout_from_disk(server, tmp_path):
    path = fabricate(tmp_path, TRIALS, spec={"name": "t-layout"})
    manifest = exp.read_manifest(path)
    report = Tracker(server.uri, "t-layout").sync(path)

    n_trials = sum(len(f) for f in TRIALS.values())
    n_points = sum(len(f.val_acc) for fakes in TRIALS.values() for f in fakes) * len(METRICS)
    assert report.runs_created == len(TRIALS) + n_trials
    assert report.metrics_logged == n_points
    client = MlflowClient(server.uri)
    runs = runs_by_name(client, "t-layout")
    assert set(runs) == set(TRIALS) | {f.trial_id for fakes in TRIALS.values() for f in fakes}

    for setting, fakes in TRIALS.items():
        parent = runs[setting]
        entry = next(s for s in manifest["settings"] if s["name"] == setting)
        assert parent.info.status == "FINISHED"
        tags, params = parent.data.tags, parent.data.params
        assert tags["jal.setting"] == setting and "mlflow.parentRunId" not in tags
        assert (tags["jal.noise_type"], float(tags["jal.noise_rate"])) == (
            entry["type"],
            entry["rate"],
        )
        assert float(tags["jal.a_min"]) == entry["a_min"]
        assert tags["jal.git_sha"] == manifest["git_sha"]
        # the spec, flattened with dotted keys
        assert params["budget.epochs"] == str(EPOCHS) and params["loss"] == "jal_ce"
        assert json.loads(params["space.alpha.loguniform"]) == [0.3, 100]
        # spec.yaml: the spec without unset (null) fields, e.g. a log-uniform param's `choice`
        local = client.download_artifacts(parent.info.run_id, "spec.yaml", str(tmp_path))
        text = open(local).read()
        assert "null" not in text and "uniform:" not in text.replace("loguniform:", "")
        logged = yaml.safe_load(text)
        assert logged["space"]["alpha"] == {"loguniform": [0.3, 100]}
        assert logged["budget"] == manifest["spec"]["budget"]
        assert logged["scheduler"] == manifest["spec"]["scheduler"]
        # the best trial, computed here from the fabricated curves
        top = best(fakes)
        assert tags["jal.best_trial"] == top.trial_id
        assert {k: float(params[f"best.{k}"]) for k in top.params} == top.params
        assert parent.data.metrics["best_val_acc"] == top.val_acc[-1]
        assert parent.data.metrics["best_epochs"] == len(top.val_acc)
        # logged at the time of the sync, not at 0 (1970)
        (point,) = client.get_metric_history(parent.info.run_id, "best_val_acc")
        assert abs(point.timestamp / 1000 - time.time()) < 120
        assert f"Best: {top.trial_id}" in tags["mlflow.note.content"]
        assert parent.info.start_time == exp_created_ms(manifest)
        # the setting's own report, there without `jal-search report`
        assert parent_files(client, parent.info.run_id) >= {
            "results/summary.md",
            "results/trials.parquet",
            "results/epochs.parquet",
            "results/best.json",
            f"results/plots/{setting}_alpha_beta.png",
            f"results/plots/{setting}_a.png",
            f"results/plots/{setting}_curves.png",
            f"results/plots/{setting}_rungs.png",
        }
        best_json = client.download_artifacts(
            parent.info.run_id, "results/best.json", str(tmp_path)
        )
        assert list(json.loads(open(best_json).read())["best"]) == [setting]  # its own only

        for fake in fakes:
            run = runs[fake.trial_id]
            tags = run.data.tags
            assert tags["mlflow.parentRunId"] == parent.info.run_id
            assert tags["jal.trial"] == f"{setting}/{fake.trial_id}"
            assert tags["jal.status"] == status(fake)
            assert run.info.status == MLFLOW_STATUS[status(fake)]
            assert tags["mlflow.note.content"].startswith(NOTES[status(fake)]) or (
                fake is top and NOTES[status(fake)] in tags["mlflow.note.content"]
            )
            assert (tags.get("jal.best") == "true") == (fake is top)
            assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
            assert tags["mlflow.source.name"] == "jal-search run fabricated"
            # the run spans the trial: from its journal's start to its last epoch
            rows = fake.rows(setting)
            assert run.info.start_time == int(STARTED * 1000)
            assert run.info.end_time == int(rows[-1]["timestamp"] * 1000)
            stamps = {m.timestamp for m in client.get_metric_history(run.info.run_id, "val_acc")}
            assert stamps == {int(r["timestamp"] * 1000) for r in rows}
            assert run.info.start_time < min(stamps) and max(stamps) <= run.info.end_time
            assert tags["jal.label_hash"] == f"hash-{setting}"
            assert float(tags["jal.noise_realised"]) == fake.rows(setting)[0]["noise_realised"]
            assert tags["jal.seed"] == str(manifest["spec"]["seed"])
            assert tags["jal.val_labels"] == manifest["spec"]["val_labels"]
            for package in ("jal-search", "torch", "ray", "mlflow"):
                assert tags[f"jal.version.{package}"] == manifest["versions"][package]
            assert {k: float(v) for k, v in run.data.params.items()} == fake.params
    assert_histories_match_disk(client, runs, TRIALS)
    experiment = client.get_experiment_by_name("t-layout")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # runs table
    assert "jal.status=stopped" in experiment.tags["mlflow.note.content"]

    # the results tables find each trial's run
    recorded = exp.read_manifest(path)["mlflow_runs"]
    assert recorded[SYM]["a0000001"] == runs["a0000001"].info.run_id


def exp_created_ms(manifest) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(manifest["created"]).timestamp() * 1000)


def parent_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= parent_files(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_sync_twice_creates_and_logs_nothing(server, tmp_path):
    path = fabricate(tmp_path, TRIALS, spec={"name": "t-twice"})
    tracker = Tracker(server.uri, "t-twice")
    tracker.sync(path)
    client = MlflowClient(server.uri)
    before = runs_by_name(client, "t-twice")
    counts = {
        n: len(client.get_metric_history(r.info.run_id, "val_acc")) for n, r in before.items()
    }
    # the same tracker (cached state) and a fresh one (state recovered from MLflow's tags)
    for again in (tracker, Tracker(server.uri, "t-twice")):
        report = again.sync(path)
        assert (report.runs_created, report.metrics_logged, report.params_logged) == (0, 0, 0)
        assert report.runs_ended == 0
    after = runs_by_name(client, "t-twice")
    assert set(after) == set(before)
    assert counts == {
        n: len(client.get_metric_history(r.info.run_id, "val_acc")) for n, r in after.items()
    }
    assert_histories_match_disk(client, after, TRIALS)


def replay(tracker: Tracker, trials: dict[str, list[FakeTrial]]) -> int:
    """Feed every fabricated epoch and trial end to the live path; returns the number of results."""
    n = 0
    for setting, fakes in trials.items():
        for fake in fakes:
            for row in fake.rows(setting):
                tracker.on_result(setting, fake.trial_id, fake.params, row)
                n += 1
            tracker.on_trial_end(setting, fake.trial_id, status(fake))
    return n


def test_live_logging_batches_each_result_and_sync_adds_no_duplicates(server, tmp_path):
    path = fabricate(tmp_path, TRIALS, spec={"name": "t-live"})
    tracker = Tracker(server.uri, "t-live")
    tracker.start(exp.read_manifest(path))
    calls = {"log_batch": 0}
    real_batch = tracker.client.log_batch

    def counting_batch(*args, **kwargs):
        calls["log_batch"] += 1
        return real_batch(*args, **kwargs)

    tracker.client.log_batch = counting_batch
    for per_metric in ("log_metric", "log_param", "set_tag"):
        setattr(tracker.client, per_metric, None)  # a per-metric round trip would raise here
    n_results = replay(tracker, TRIALS)
    n_trials = sum(len(f) for f in TRIALS.values())
    assert not tracker.behind
    # one batch per result, plus one per trial end (its jal.status tag)
    assert calls["log_batch"] == n_results + n_trials

    report = tracker.sync(path)
    assert (report.runs_created, report.metrics_logged) == (0, 0)
    client = MlflowClient(server.uri)
    runs = runs_by_name(client, "t-live")
    assert_histories_match_disk(client, runs, TRIALS)
    for fakes in TRIALS.values():
        for fake in fakes:
            assert runs[fake.trial_id].info.status == MLFLOW_STATUS[status(fake)]

    # a driver restarted on the same experiment finds its runs and does not log epochs twice
    restarted = Tracker(server.uri, "t-live")
    restarted.start(exp.read_manifest(path))
    replay(restarted, TRIALS)
    assert set(runs_by_name(client, "t-live")) == set(runs)
    assert_histories_match_disk(client, runs, TRIALS)


def test_outage_never_raises_and_the_gap_is_filled_exactly(server, tmp_path, capsys):
    trials = {
        SYM: [
            FakeTrial("a0000001", p(10.0), [0.50, 0.60, 0.70, 0.80]),
            FakeTrial("b0000002", p(20.0), [0.40, 0.45, 0.50, 0.55]),
            FakeTrial("c0000003", p(30.0), [0.30, 0.35]),
        ]
    }
    fake_a, fake_b, _ = trials[SYM]
    rows_a, rows_b = fake_a.rows(SYM), fake_b.rows(SYM)
    paths = {name: fabricate(tmp_path / name, trials, spec={"name": name}) for name in ("s", "l")}
    # `s` catches up through sync; `l` through its next successful live call
    by_sync, by_live = Tracker(server.uri, "s"), Tracker(server.uri, "l", retry_seconds=0)
    for name, tracker in (("s", by_sync), ("l", by_live)):
        tracker.start(exp.read_manifest(paths[name]))
    for row in rows_a[:2]:
        by_sync.on_result(SYM, "a0000001", fake_a.params, row)
    by_live.on_result(SYM, "a0000001", fake_a.params, rows_a[0])
    capsys.readouterr()

    server.stop()
    began = time.monotonic()
    by_sync.on_result(SYM, "a0000001", fake_a.params, rows_a[2])
    by_live.on_result(SYM, "a0000001", fake_a.params, rows_a[1])
    by_live.on_result(SYM, "b0000002", fake_b.params, rows_b[0])
    assert time.monotonic() - began < 15  # live calls fail fast instead of retrying for minutes
    assert by_sync.behind and by_live.behind
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: MLflow") for w in warnings)

    server.start()
    client = MlflowClient(server.uri)
    # the next live result pushes the backlog: a's epochs 2-3 and b's first epoch
    by_live.on_result(SYM, "a0000001", fake_a.params, rows_a[2])
    live_runs = runs_by_name(client, "l")
    assert [s for s, _ in points(client, live_runs["a0000001"].info.run_id, "val_acc")] == [1, 2, 3]
    assert [s for s, _ in points(client, live_runs["b0000002"].info.run_id, "val_acc")] == [1]

    total = sum(len(f.val_acc) for f in trials[SYM])
    for tracker, name, logged_live in ((by_sync, "s", 2), (by_live, "l", 3 + 1)):
        report = tracker.sync(paths[name])
        assert report.metrics_logged == (total - logged_live) * len(METRICS)
        assert not tracker.behind
        assert_histories_match_disk(client, runs_by_name(client, name), trials)


def test_a_setting_ended_live_has_its_best_trial_and_report_without_a_sync(server, tmp_path):
    """The live path alone, as a search drives it: once the setting's last trial ends, its parent
    is FINISHED with the best trial and the setting's report; children span their trials."""
    fakes = TRIALS[SYM]
    spec = {"name": "t-end", "budget": {"trials": len(fakes), "epochs": EPOCHS}}
    path = fabricate(tmp_path, {SYM: fakes}, spec=spec, status="running")
    tracker = Tracker(server.uri, "t-end")
    tracker.start(exp.read_manifest(path), path=path)
    client = MlflowClient(server.uri)
    for i, fake in enumerate(fakes):
        for row in fake.rows(SYM):  # Tune's results carry whole-second timestamps
            tracker.on_result(SYM, fake.trial_id, fake.params, {**row, "timestamp": 1})
        if i == len(fakes) - 1:  # before the last trial ends: the setting is still running
            parent = runs_by_name(client, "t-end")[SYM]
            assert parent.info.status == "RUNNING"
            assert not parent_files(client, parent.info.run_id) - {"spec.yaml"}
        tracker.on_trial_end(SYM, fake.trial_id, status(fake))
    tracker.wait()  # the setting's end runs in the background
    assert not tracker.behind
    runs = runs_by_name(client, "t-end")
    parent, top = runs[SYM], best(fakes)
    assert parent.info.status == "FINISHED" and parent.data.tags["jal.status"] == "done"
    assert parent.data.tags["jal.best_trial"] == top.trial_id
    assert parent.data.metrics["best_val_acc"] == top.val_acc[-1]
    assert (
        parent.data.metrics["best_val_acc_clean_est"] == fakes[0].rows(SYM)[-1]["val_acc_clean_est"]
    )
    assert {"results/summary.md", f"results/plots/{SYM}_a.png"} <= parent_files(
        client, parent.info.run_id
    )
    for fake in fakes:
        run = runs[fake.trial_id]
        assert run.info.status == MLFLOW_STATUS[status(fake)]
        assert (run.data.tags.get("jal.best") == "true") == (fake is top)
        assert run.info.start_time == int(STARTED * 1000)  # the journal's, not the first result
        assert run.info.end_time == int(fake.rows(SYM)[-1]["timestamp"] * 1000)
        stamps = [m.timestamp for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(stamps) == [int(r["timestamp"] * 1000) for r in fake.rows(SYM)]

    # the search's end: the manifest marks it done (with the failure's reason), and sync adds it
    exp.update_setting(path, SYM, status="done", failures={"d0000004": "RuntimeError: boom"})
    report = tracker.sync(path)
    assert (report.runs_created, report.metrics_logged, report.runs_ended) == (0, 0, 0)
    failed = runs_by_name(client, "t-end")["d0000004"]
    assert failed.data.tags["mlflow.note.content"] == NOTES["failed"] + "."


def test_a_setting_s_end_does_not_hold_up_the_search(server, tmp_path):
    """The setting's end (its report's plots take a second) runs in a thread of its own: the last
    trial's end returns at once even while another MLflow call is under way, and the parent is
    finished once that call is done."""
    fakes = TRIALS[SYM]
    spec = {"name": "t-busy", "budget": {"trials": len(fakes), "epochs": EPOCHS}}
    path = fabricate(tmp_path, {SYM: fakes, ASYM: TRIALS[ASYM]}, spec=spec, status="running")
    tracker = Tracker(server.uri, "t-busy")
    tracker.start(exp.read_manifest(path), path=path)
    for fake in fakes:
        for row in fake.rows(SYM):
            tracker.on_result(SYM, fake.trial_id, fake.params, row)
    client = MlflowClient(server.uri)
    with tracker._busy:  # another MLflow call under way, e.g. a result being logged
        for fake in fakes:
            tracker.on_trial_end(SYM, fake.trial_id, status(fake))
        assert runs_by_name(client, "t-busy")[SYM].info.status == "RUNNING"
    tracker.wait()
    parent = runs_by_name(client, "t-busy")[SYM]
    assert parent.info.status == "FINISHED" and parent.data.tags["jal.status"] == "done"
    assert f"results/plots/{SYM}_a.png" in parent_files(client, parent.info.run_id)
    # The trials' ends queued while MLflow was busy never take the best tag away: not when the
    # next setting's results are logged, nor at the search's final sync.
    other = TRIALS[ASYM][0]
    tracker.on_result(ASYM, other.trial_id, other.params, other.rows(ASYM)[0])
    top = best(fakes).trial_id
    for _ in range(2):
        runs = runs_by_name(client, "t-busy")
        assert [f.trial_id for f in fakes if runs[f.trial_id].data.tags.get("jal.best")] == [top]
        assert {runs[f.trial_id].info.status for f in fakes} <= {"FINISHED", "FAILED"}
        exp.update_setting(path, SYM, status="done")
        tracker.sync(path)


def test_ties_are_broken_by_epochs_then_trial_id_and_said_where_they_happen(server, tmp_path):
    trials = {
        SYM: [
            FakeTrial("t1", p(10.0), [0.5, 0.6]),  # stopped at epoch 2
            FakeTrial("t2", p(11.0), [0.4, 0.5, 0.55, 0.6]),
            FakeTrial("t3", p(12.0), [0.3, 0.4, 0.5, 0.6]),
            FakeTrial("t0", p(13.0), [0.9, 0.5]),
        ]
    }
    path = fabricate(tmp_path, trials, spec={"name": "t-tie"})
    tracker = Tracker(server.uri, "t-tie")
    tracker.sync(path)
    client = MlflowClient(server.uri)
    runs = runs_by_name(client, "t-tie")
    rule = "ties go to the trial that reached more epochs, then to the smaller trial id"
    parent_note = runs[SYM].data.tags["mlflow.note.content"]
    assert "3 trials tie at val_acc 0.6000 (t2, t3, t1)" in parent_note and rule in parent_note
    assert runs[SYM].data.tags["jal.best_trial"] == "t2"
    assert [n for n in ("t0", "t1", "t2", "t3") if runs[n].data.tags.get("jal.best")] == ["t2"]
    assert rule in runs["t2"].data.tags["mlflow.note.content"]

    # `extend` adds a better trial: the tag and the parent's best move to it
    other = fabricate(tmp_path / "more", {SYM: [FakeTrial("t4", p(14.0), [0.7] * EPOCHS)]})
    (path / SYM / "t4").mkdir()
    (path / SYM / "t4" / "journal.jsonl").write_bytes(
        (other / SYM / "t4" / "journal.jsonl").read_bytes()
    )
    tracker.sync(path)
    runs = runs_by_name(client, "t-tie")
    assert [n for n in runs if runs[n].data.tags.get("jal.best") == "true"] == ["t4"]
    assert runs[SYM].data.metrics["best_val_acc"] == 0.7


def test_live_calls_pause_after_a_failure_and_leak_no_credentials(tmp_path, monkeypatch, capsys):
    secret, password = secrets.token_hex(8), secrets.token_hex(8)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    path = fabricate(tmp_path, {SYM: TRIALS[SYM][:1]})
    tracker = Tracker(f"http://jal:{secret}@127.0.0.1:{free_port()}", "dead", retry_seconds=600)
    tracker.start(exp.read_manifest(path))  # nothing listens there
    assert tracker.behind
    fake = TRIALS[SYM][0]
    tracker.client.search_runs = tracker.client.log_batch = None  # any call now would raise
    tracker.client.get_experiment_by_name = None
    tracker.on_result(SYM, fake.trial_id, fake.params, fake.rows(SYM)[0])
    tracker.on_trial_end(SYM, fake.trial_id, "completed")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert secret not in err and password not in err and "***" in err
    with pytest.raises(ValueError, match="status 'running'"):
        tracker.on_trial_end(SYM, fake.trial_id, "running")


def test_sync_to_an_unreachable_server_is_a_one_line_user_error(tmp_path):
    path = fabricate(tmp_path, {SYM: TRIALS[SYM][:1]})
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "dead")
    with pytest.raises(UserError, match="jal-search sync") as caught:
        tracker.sync(path)
    assert "\n" not in str(caught.value) and tracker.behind


def test_no_secret_reaches_params_tags_or_artifacts(server, tmp_path, monkeypatch, capsys):
    password, in_uri = secrets.token_hex(8), secrets.token_hex(8)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "jal")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    # A URI with credentials is refused before it could be stored, without echoing them.
    with pytest.raises(UserError) as refused:
        fabricate(tmp_path / "x", TRIALS, spec={"tracking_uri": f"http://jal:{in_uri}@h:5000"})
    assert in_uri not in str(refused.value)
    spec = {"name": "t-secret", "tracking_uri": "http://mlflow.example:5000"}
    path = fabricate(tmp_path, TRIALS, spec=spec)
    Tracker(server.uri, "t-secret").sync(path)

    client = MlflowClient(server.uri)
    captured = capsys.readouterr()
    texts = [captured.out, captured.err]
    for run in runs_by_name(client, "t-secret").values():
        texts += [*run.data.params.values(), *run.data.tags.values()]
        for item in parent_files(client, run.info.run_id):  # binary ones too (parquet)
            local = client.download_artifacts(run.info.run_id, item, str(tmp_path))
            texts.append(open(local, "rb").read().decode("utf-8", "replace"))
    assert "http://mlflow.example:5000" in texts  # the spec's URI is logged
    assert not [t for t in texts if password in t or in_uri in t]


def test_default_sqlite_store_keeps_artifacts_next_to_the_database(tmp_path, monkeypatch):
    path = fabricate(tmp_path / "store", {ASYM: TRIALS[ASYM]})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = default_tracking_uri(path)
    assert uri == f"sqlite:///{path.parent / 'mlflow.db'}"
    report = Tracker(uri, "local").sync(path)
    assert report.runs_created == 2 + len(TRIALS[ASYM])  # both settings' parents, pending or not
    assert (path.parent / "mlflow.db").is_file()
    assert len(list((path.parent / "mlartifacts").rglob("spec.yaml"))) == 2  # one per parent
    assert not os.listdir(cwd)  # MLflow's ./mlruns default is not used
    again = Tracker(uri, "local").sync(path)
    assert (again.runs_created, again.metrics_logged) == (0, 0)


@pytest.mark.parametrize(
    "uri", ["sqlite:////shared/mlflow.db", "file:///shared/mlruns", "/shared/mlruns", "mlruns"]
)
def test_file_stores_are_refused_on_multi_node_clusters(uri):
    check_multi_node(uri, 1)  # a single node may use them
    with pytest.raises(UserError, match=r"3 nodes.*--tracking-uri http://"):
        check_multi_node(uri, 3)


def test_servers_are_accepted_on_multi_node_clusters():
    for uri in ("http://mlflow:5000", "https://u@mlflow.example", "postgresql://db/mlflow"):
        check_multi_node(uri, 8)
