"""Fault 2: a trial diverges (its loss becomes NaN). Promise: it stops at once with status
`diverged`, is never selected as best under any scope, and the search goes on.

The fault is a real one: plain cross-entropy with a learning rate of 1e6 overflows in the
first epoch (checked below by the trial's own NaN loss); a grid makes the run deterministic.
"""

import math

import pyarrow.parquet as pq
from faultkit import write_spec
from mlflow import MlflowClient

from jal_search import results, search
from jal_search.experiment import read_manifest

EPOCHS, HUGE, SANE = 3, 1.0e6, 0.05


def test_a_diverged_trial_stops_at_once_and_never_wins(local_ray, tmp_path, capsys):
    spec = write_spec(
        tmp_path,
        "diverge",
        loss="ce",
        noise={"symmetric": [0.4], "asymmetric": [0.2]},
        space={"lr": {"choice": [HUGE, SANE]}},
        searcher={"type": "grid"},
        budget={"trials": 2, "epochs": EPOCHS},
    )
    path = search.run(str(spec))
    assert [s["status"] for s in read_manifest(path)["settings"]] == ["done", "done"]
    assert all(not s["failures"] for s in read_manifest(path)["settings"])

    results.write_tables(path)
    trials = pq.read_table(path / "results/trials.parquet").to_pylist()
    epochs = pq.read_table(path / "results/epochs.parquet").to_pylist()
    assert len(trials) == 4  # both settings ran both trials: the divergence stopped nothing else
    for t in trials:
        curve = [
            e for e in epochs if (e["setting"], e["trial_id"]) == (t["setting"], t["trial_id"])
        ]
        if t["param_lr"] == HUGE:
            assert t["status"] == "diverged" and t["epochs"] == 1  # stopped at once
            assert curve[-1]["diverged"] and math.isnan(curve[-1]["train_loss"])
            assert math.isnan(t["final_val_acc"])
        else:
            assert (t["status"], t["epochs"]) == ("completed", EPOCHS)
            assert not any(e["diverged"] for e in curve)

    for scope in results.SCOPES:
        chosen = results.best(path, scope=scope)
        assert {s: c.params["lr"] for s, c in chosen.items()} == {
            "symmetric-0.4": SANE,
            "asymmetric-0.2": SANE,
        }, scope
    assert "best config per noise setting" in capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("diverge").experiment_id
    children = [r for r in client.search_runs([exp_id]) if r.data.tags.get("jal.role") == "trial"]
    statuses = sorted(
        (r.data.params["lr"], r.info.status, r.data.tags["jal.status"]) for r in children
    )
    assert (
        statuses
        == [("0.05", "FINISHED", "completed")] * 2 + [("1000000.0", "FAILED", "diverged")] * 2
    )
