"""Packed searches on a real local Ray: each Tune trial trains a pack of configs; downstream
(results, MLflow) every member is a trial of its own, with what `run_trial` would have given it:
its own labels, lr schedule and epochs exactly, its metrics as far as rounding lets them agree
(`jal_search.packed`'s docstring; a few steps to rounding are checked in tests/test_packed.py)."""

import pytest
import yaml

from jal_search import results, search
from jal_search.experiment import read_manifest, read_trials
from jal_search.journal import JOURNAL, read_journal
from jal_search.spec import parse_spec, plan
from jal_search.train import run_trial

SPEC = {
    "name": "packed",
    "dataset": "digits",
    "loss": "jal_ce",
    "noise": {"symmetric": [0.4]},
    "space": {"alpha": {"choice": [1.0, 10.0]}, "lr": {"choice": [0.02, 1.0e30]}},
    "budget": {"trials": 4, "epochs": 3},
    "scheduler": {"type": "none"},
    "searcher": {"type": "grid"},
    "resources": {"cpus_per_trial": 1},
    "max_concurrent_trials": 2,
    "pack": 3,
}

# A pack of 3 in a Ray actor and a lone run in this process round differently; over 3 noisy epochs
# they share only the distribution of their results. The bands of tests/test_packed.py; for this
# config (alpha 10, lr 0.02, 3 epochs) 10-ulp nudges of every weight after every step moved
# test_acc ≤ 0.0056, val_acc ≤ 0.014 and train_loss ≤ 4e-5 relative over 20 seeds, while the
# other member's alpha (1) moves test_acc by 0.28 and 0.11 and train_loss by 0.6% and 0.24%
# after epochs 1 and 2.
ACC_BAND = 0.05
LOSS_BAND = 1e-3


@pytest.fixture(scope="module")
def packed(local_ray, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    (folder / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return search.run(str(folder / "spec.yaml"), storage_path=str(folder / "runs"))


def test_a_packed_grid_gives_every_config_its_own_trial(packed):
    (setting,) = read_manifest(packed)["settings"]
    assert setting["status"] == "done" and setting["failures"] == {}
    folder = packed / setting["name"]
    pack_folders = [p for p in folder.glob("t*") if any(p.glob("checkpoint-*"))]
    assert len(pack_folders) == 2  # 4 configs in packs of 3 and 1: their checkpoints
    trials = read_trials(packed, setting["name"], {})
    assert sorted((t.config["alpha"], t.config["lr"]) for t in trials) == [
        (1.0, 0.02), (1.0, 1e30), (10.0, 0.02), (10.0, 1e30)
    ]  # fmt: skip
    assert {t.trial_id.rsplit("-m", 1)[0] for t in trials} == {p.name for p in pack_folders}
    for t in trials:
        if t.config["lr"] == 1e30:  # diverges in its first epoch and leaves its pack
            assert t.status(3, True) == "diverged" and len(t.history) == 1
        else:
            assert t.status(3, True) == "completed"
            assert [r["training_iteration"] for r in t.history] == [1, 2, 3]


def test_a_member_trains_as_its_config_would_alone(packed):
    (setting,) = read_manifest(packed)["settings"]
    trials = read_trials(packed, setting["name"], {})
    member = next(t for t in trials if t.config == {"alpha": 10.0, "lr": 0.02})
    (p,) = plan(parse_spec(SPEC, where="spec"))
    alone = run_trial(p.trial(member.config))
    assert member.status(3, True) == alone.status == "completed"
    assert len(member.history) == len(alone.history) == 3
    for a, m in zip(alone.history, member.history, strict=True):
        # Exactly: what does not depend on rounding (its own noisy labels, epochs, lr schedule).
        assert m["label_hash"] == alone.data.label_hash
        for key in ("epoch", "lr", "noise_realised", "diverged"):
            assert m[key] == a[key], (a["epoch"], key)
        assert m["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_BAND), a["epoch"]
        for key in ("noisy_fit", "memorized", "val_acc", "test_acc"):
            assert m[key] == pytest.approx(a[key], abs=ACC_BAND), (a["epoch"], key)


def test_results_and_mlflow_see_members_as_trials(packed):
    from mlflow import MlflowClient

    from jal_search.tracking import default_tracking_uri

    ex = results.with_trials(packed)
    table = results.trials_table(ex)
    assert table.num_rows == 4
    best = results.best(ex, scope="last")
    assert best["symmetric-0.4"].params["lr"] == 0.02  # diverged members are never selected
    client = MlflowClient(default_tracking_uri(packed))
    (experiment,) = client.search_experiments(filter_string="name = 'packed'")
    children = client.search_runs([experiment.experiment_id], "tags.`jal.role` = 'trial'")
    assert sorted(r.data.tags["jal.trial"] for r in children) == sorted(
        f"symmetric-0.4/{t.trial_id}" for t in read_trials(packed, "symmetric-0.4", {})
    )
    statuses = sorted(r.data.tags["jal.status"] for r in children)
    assert statuses == ["completed", "completed", "diverged", "diverged"]
    for run in children:
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert len(history) == (3 if run.data.params["lr"] == "0.02" else 1)
    # The journals say the same thing: one row per epoch each member trained.
    rows = [read_journal(f.parent)[1] for f in (packed / "symmetric-0.4").glob(f"*/{JOURNAL}")]
    assert sorted(len(r) for r in rows) == [1, 1, 3, 3]
