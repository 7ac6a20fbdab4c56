"""Multi-node: a real `ray.cluster_utils.Cluster` (head + 2 workers, one CPU each) on 127.0.0.1."""

import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow_server import MlflowServer

from jal_search import search
from jal_search.cli import main
from jal_search.experiment import read_manifest, read_trials

EPOCHS = 8


def spec_file(tmp_path: Path, **extra) -> Path:
    spec = {
        "name": "multi", "dataset": "digits", "loss": "jal_ce", "noise": {"symmetric": [0.4]},
        "space": {"alpha": {"loguniform": [0.3, 100]}},
        "budget": {"trials": 5, "epochs": EPOCHS}, "scheduler": {"type": "none"},
        "max_concurrent_trials": 3, "max_failures": 2, "storage_path": str(tmp_path / "runs"),
        **extra,
    }  # fmt: skip
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory):
    """Multi-node searches refuse file tracking: a real MLflow server on 127.0.0.1."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    )
    workers = [c.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_local_storage_on_a_multi_node_cluster_is_refused(cluster, tmp_path, capsys):
    c, _ = cluster
    assert main(["run", str(spec_file(tmp_path)), "--address", c.address]) == 2
    assert "storage_shared: true" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "multi" / "experiment.json").exists()  # nothing half-written


@pytest.mark.slow
def test_trials_spread_over_nodes_and_survive_losing_one(cluster, mlflow, tmp_path):
    # The fault: a worker node dies while it runs a trial. The promise: the trial resumes on
    # another node from its last checkpoint and the search completes without a failed trial.
    c, workers = cluster
    victim = workers[0]
    runs = tmp_path / "runs" / "multi" / "symmetric-0.4"
    removed: dict[str, str] = {}

    def remove_victim_once_it_trains():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for journal in runs.glob("*/journal.jsonl"):
                lines = journal.read_text().splitlines()
                if len(lines) >= 3 and f'"node_id": "{victim.node_id}"' in lines[-1]:
                    removed["trial"] = journal.parent.name
                    c.remove_node(victim)
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=remove_victim_once_it_trains, daemon=True)
    watcher.start()
    spec = spec_file(tmp_path, storage_shared=True, tracking_uri=mlflow.uri)
    path = search.run(str(spec), address=c.address)
    watcher.join(timeout=5)
    assert "trial" in removed, "the victim node never ran a trial"

    setting = read_manifest(path)["settings"][0]
    assert setting["status"] == "done" and setting["failures"] == {}
    trials = read_trials(path, "symmetric-0.4", {})
    every_epoch = list(range(1, EPOCHS + 1))
    assert len(trials) == 5
    assert all([row["training_iteration"] for row in t.history] == every_epoch for t in trials)
    # The watcher saw the moved trial train on the victim; it finished elsewhere.
    moved = next(t for t in trials if t.trial_id == removed["trial"])
    elsewhere = [r["training_iteration"] for r in moved.history if r["node_id"] != victim.node_id]
    assert elsewhere and elsewhere[0] > 1  # continued from a checkpoint, not from scratch
