"""The Ray adapter: its private cluster's trial processes, its Tune callbacks and searcher."""

import ast
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import optuna
import ray
from ray import tune

from jal_search import tune_adapter, tune_callbacks, tune_search


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
    keep = tune_callbacks.KeepResultsOnRestart()
    keep.on_trial_start(0, [], trial)  # a fresh start: Tune restores nothing, nor do we
    assert (stored / "result.json").read_text() == rows[0] + "\n"
    # A restart from the checkpoint of epoch 2: epoch 3 will be reported again, epoch 4 was cut.
    trial.latest_checkpoint_result = SimpleNamespace(metrics={"epoch": 2.0})
    keep.on_trial_start(0, [], trial)
    assert (stored / "result.json").read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert sorted(p.name for p in stored.iterdir()) == ["result.json"]  # no temporary left


def test_a_restarting_trial_forgets_checkpoints_no_longer_on_disk(tmp_path):
    # Tune's saved state can list a checkpoint it deleted just before a kill; deleting it again
    # would fail the trial. Tune's Trial stands in as the attributes the callback reads.
    kept = [tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000002"]
    for folder in kept:
        folder.mkdir()
    listed = [SimpleNamespace(checkpoint=SimpleNamespace(path=str(tmp_path / "checkpoint_000000")))]
    listed += [SimpleNamespace(checkpoint=SimpleNamespace(path=str(f))) for f in kept]
    manager = SimpleNamespace(_checkpoint_results=list(listed))
    trial = SimpleNamespace(
        latest_checkpoint_result=listed[-1],
        run_metadata=SimpleNamespace(checkpoint_manager=manager),
    )
    tune_callbacks.ForgetLostCheckpoints().on_trial_start(0, [], trial)
    assert manager._checkpoint_results == listed[1:]


def test_resume_state_is_the_last_complete_set_tune_wrote(tmp_path):
    # A kill while Tune's state is copied to the experiment folder leaves one file truncated,
    # another from an older step, and possibly a newer session's first files; resume must see
    # exactly the set the backup took right after Tune wrote it. The files are real.
    staging, experiment = tmp_path / "staging", tmp_path / "experiment"
    staging.mkdir()
    experiment.mkdir()
    saved = {
        "experiment_state-A.json": b'{"trials": [1, 2, 3]}',
        "searcher-state-A.pkl": b"\x80\x04searcher knows 1, 2, 3",
        "search_gen_state-A.json": b'{"counter": 3}',
    }
    for name, raw in saved.items():
        (staging / name).write_bytes(raw)
    (staging / "experiment.json").write_text("{}")  # Tune's restore copies the manifest in too
    backup = tune_callbacks.BackUpState()
    tune_callbacks.DRIVER["experiment_dir"] = experiment
    try:
        backup.get_state()  # before Tune's first save: nothing to copy, and no error
        assert not (experiment / tune_callbacks.STATE_BACKUP).exists()
        tune_callbacks.DRIVER.update(staging=str(staging), session="A")  # as the searcher hears
        backup.get_state()
    finally:
        tune_callbacks.DRIVER.clear()
    (staging / "experiment_state-A.json").write_bytes(b'{"trials": [1, 2, 3, 4')  # Tune rewrites
    assert sorted(p.name for p in staging.iterdir()) == sorted(saved)  # no stale manifest to sync

    (experiment / "experiment_state-A.json").write_bytes(b"")
    (experiment / "searcher-state-A.pkl").write_bytes(b"\x80\x04searcher knows 1")
    (experiment / "experiment_state-B.json").write_bytes(b'{"trials": [1, 2, 3, 4, 5]}')
    tune_callbacks.restore_state(experiment)
    on_disk = {p.name: p.read_bytes() for p in experiment.iterdir()}
    assert on_disk == {**saved, tune_callbacks.STATE_BACKUP: on_disk[tune_callbacks.STATE_BACKUP]}
    (experiment / tune_callbacks.STATE_BACKUP).write_bytes(b"PK\x03\x04 cut")  # damaged set
    tune_callbacks.restore_state(experiment)  # Tune's own files stay: no error, nothing removed
    assert {p.name: p.read_bytes() for p in experiment.iterdir()} == {
        **saved,
        tune_callbacks.STATE_BACKUP: b"PK\x03\x04 cut",
    }

    with zipfile.ZipFile(experiment / tune_callbacks.STATE_BACKUP, "w") as crafted:
        crafted.writestr("../experiment_state-Z.json", "{}")  # outside the experiment
        crafted.writestr("tuner.pkl", b"\x80\x04not Tune's")  # not a state file
        crafted.writestr("experiment_state-A.json", b'{"trials": []}')
    tune_callbacks.restore_state(experiment)
    assert not (tmp_path / "experiment_state-Z.json").exists()
    assert not (experiment / "tuner.pkl").exists()
    assert (experiment / "experiment_state-A.json").read_bytes() == b'{"trials": []}'

    (tmp_path / "never_started").mkdir()
    (tmp_path / "never_started" / "experiment_state-A.json").write_bytes(b"{}")
    tune_callbacks.restore_state(tmp_path / "never_started")  # no backup: left as Tune wrote it
    assert (tmp_path / "never_started" / "experiment_state-A.json").read_bytes() == b"{}"


def _searcher(sampler: optuna.samplers.BaseSampler) -> tune_search.JalOptunaSearch:
    space = {"alpha": tune.choice([1.0, 10.0]), "a": tune.choice([5.0, 15.0, 30.0])}
    return tune_search.JalOptunaSearch(
        4, space=space, metric="val_acc", mode="max", sampler=sampler, seed=0
    )


def _finish(searcher: tune_search.JalOptunaSearch, trial_id: str, config: dict) -> None:
    value = config["alpha"] / 100 + config["a"] / 1000  # each config its own score
    for epoch in (1, 2, 3, 4):
        searcher.on_trial_result(trial_id, {"training_iteration": epoch, "val_acc": value})
    searcher.on_trial_complete(trial_id, {"training_iteration": 4, "val_acc": value})


def test_optuna_on_a_finite_space_never_trains_a_config_twice():
    # A sampler that always proposes the same config: every draw after the first is a repeat,
    # so each trial needs the redraws and then the untried fallback.
    stuck = optuna.samplers.PartialFixedSampler(
        {"alpha": 10.0, "a": 30.0}, optuna.samplers.RandomSampler(seed=0)
    )
    searcher = _searcher(stuck)
    running = searcher.suggest("t0")
    seen = [running]
    for n in range(1, 6):  # one trial always running, as with two at a time
        config = searcher.suggest(f"t{n}")
        assert config not in seen  # neither a finished config nor the running one
        seen.append(config)
        _finish(searcher, f"t{n - 1}", seen[n - 1])
    assert len(seen) == 6  # the whole space, in 6 trials
    # Repeated draws were told their twin's outcome: a finished twin's value, or pruned while the
    # twin still ran; none is a value Optuna was not shown by a real trial.
    real = {json.dumps(c, sort_keys=True) for c in seen}
    study = searcher._ot_study
    for trial in study.trials:
        if trial.state.name == "COMPLETE":
            twin = next(t for t in study.trials if t.params == trial.params)
            assert trial.value == twin.value
        assert json.dumps(trial.params, sort_keys=True) in real
    assert sum(t.state.name == "COMPLETE" for t in study.trials) > 5  # repeats were told


def test_only_the_tune_modules_import_ray():
    # Ray's API moves quickly: one adapter (tune_adapter and its tune_* modules) absorbs it.
    package = Path(tune_adapter.__file__).parent
    importers = set()
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(module.stem)
    assert importers == {"tune_adapter", "tune_search", "tune_callbacks"}
