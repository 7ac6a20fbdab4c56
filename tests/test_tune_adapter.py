"""The Ray adapter's private cluster: what trial processes start with."""

import json
from types import SimpleNamespace

import ray

from jal_search import tune_adapter


def test_trial_processes_start_with_the_trial_environment():
    # glibc reads its malloc settings once, at exec: they must be in the process's initial
    # environment (/proc/self/environ), not set later by os.environ.
    cluster = tune_adapter.connect(None, 1)
    try:
        assert cluster.started_here and cluster.cpus == 1

        @ray.remote(num_cpus=1)
        def initial_environment() -> list[str]:
            with open("/proc/self/environ") as f:
                return f.read().split("\0")

        env = ray.get(initial_environment.remote())
    finally:
        tune_adapter.disconnect(cluster)
    assert not ray.is_initialized()
    for key, value in tune_adapter.TRIAL_ENV.items():
        assert f"{key}={value}" in env
    assert "MALLOC_MMAP_THRESHOLD_" in tune_adapter.TRIAL_ENV


def test_a_restarting_trial_gets_the_results_up_to_its_checkpoint(tmp_path):
    # Tune's Trial stands in as the attributes the callback reads; the files are real.
    staging, stored = tmp_path / "staging", tmp_path / "storage"
    staging.mkdir()
    stored.mkdir()
    rows = [json.dumps({"epoch": e, "val_acc": e / 10}) for e in (1, 2, 3)]
    (staging / "result.json").write_text("\n".join([*rows, '{"epoch": 4, "val']) + "\n")
    (stored / "result.json").write_text(rows[0] + "\n")  # the background sync lagged
    trial = SimpleNamespace(
        latest_checkpoint_result=None,
        local_path=str(staging),
        storage=SimpleNamespace(trial_fs_path=str(stored)),
    )
    keep = tune_adapter._KeepResultsOnRestart()
    keep.on_trial_start(0, [], trial)  # a fresh start: Tune restores nothing, nor do we
    assert (stored / "result.json").read_text() == rows[0] + "\n"
    # A restart from the checkpoint of epoch 2: epoch 3 will be reported again, epoch 4 was cut.
    trial.latest_checkpoint_result = SimpleNamespace(metrics={"epoch": 2.0})
    keep.on_trial_start(0, [], trial)
    assert (stored / "result.json").read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert sorted(p.name for p in stored.iterdir()) == ["result.json"]  # no temporary left
