"""Searches in the driver's own process (`executor: local`): the same record as under Ray, without
Ray; failed trials retried from their checkpoints; what a resume finds. (Its promotion decisions
against Optuna's pruner, and a resume after the driver is killed or interrupted, are tested with
the Ray executor's, in test_tune_adapter and test_search.)"""

import json
import platform
import subprocess
import sys

import optuna
import pytest
import scripted
import yaml
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from jal_search import local_search
from jal_search.errors import UserError
from jal_search.experiment import read_manifest, read_trials
from jal_search.spec import parse_spec, plan, trials_per_setting
from jal_search.studies import STUDY_FILE
from jal_search.tracking import default_tracking_uri


def study_states(folder) -> dict[str, str]:
    """Per trial name, its state in the setting's study."""
    storage = JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))
    study = optuna.load_study(study_name="jal", storage=storage)
    return {f"t{t.number:05d}": t.state.name for t in study.trials if "jal.config" in t.user_attrs}


def test_a_local_search_keeps_the_record_of_a_search_and_never_imports_ray(tmp_path):
    spec = {
        "name": "here", "dataset": "digits", "loss": "jal_ce", "executor": "local",
        "noise": {"symmetric": [0.4], "asymmetric": [0.2]},
        "space": {"alpha": {"loguniform": [0.3, 30]}, "beta": {"loguniform": [0.1, 3]}},
        "budget": {"trials": 6, "epochs": 4},
        # Paused halving, not Optuna's rule: it stops trials at a rung whatever order they
        # arrive in (Optuna's lets all on where each arrives among the best so far: seen once).
        "scheduler": {"type": "paused_halving", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 2,
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code = (
        "import json, os, sys; from jal_search import search; "
        f"search.run({str(tmp_path / 'spec.yaml')!r}, storage_path={str(tmp_path)!r}); "
        "print(json.dumps({'pid': os.getpid(), 'ray': 'ray' in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    ran = json.loads(out.stdout.splitlines()[-1])
    assert ran["ray"] is False
    path = tmp_path / "here"
    manifest = read_manifest(path)
    assert [s["status"] for s in manifest["settings"]] == ["done", "done"]
    client = MlflowClient(default_tracking_uri(path))
    (experiment,) = client.search_experiments(filter_string="name = 'here'")
    children = client.search_runs([experiment.experiment_id], "tags.`jal.role` = 'trial'")
    assert len(children) == 12 and {r.info.status for r in children} == {"FINISHED"}
    for setting in manifest["settings"]:
        trials = read_trials(path, setting["name"], setting["failures"])
        assert len(trials) == 6 and not setting["failures"]
        epochs = [len(t.history) for t in trials]
        assert max(epochs) == 4 and min(epochs) < 4  # the rule stopped some at a rung
        for t in trials:  # trained in the driver's process, epoch after epoch
            assert [row["epoch"] for row in t.history] == list(range(1, len(t.history) + 1))
            assert {(r["pid"], r["node_id"]) for r in t.history} == {(ran["pid"], platform.node())}
        states = study_states(path / setting["name"])
        assert sorted(states) == sorted(t.trial_id for t in trials)
        for t in trials:  # stopped at a rung: pruned; at the budget: complete
            assert states[t.trial_id] == ("COMPLETE" if len(t.history) == 4 else "PRUNED")
    assert "best config per noise setting" in out.stdout
    assert "stopped at epoch 1" in out.stdout  # a line per trial as it ends


EPOCHS = 4
ALWAYS, ONCE = 10.0, 1.0  # alpha of the trial that always fails, and of the one that fails once


def flaky(config, report=None, resume=None):
    """Scripted training where alpha ALWAYS raises at once, and alpha ONCE raises after two
    epochs the first time (it then goes on from its checkpoint)."""
    alpha = config.loss_params["alpha"]
    if alpha == ALWAYS:
        raise RuntimeError("boom")
    if alpha == ONCE and resume is None:
        scripted.scripted_trial(config.model_copy(update={"epochs": 2}), report)
        raise RuntimeError("flaky")
    scripted.scripted_trial(config, report, resume)


def test_a_failing_trial_is_retried_from_its_checkpoint_then_left_for_resume(tmp_path, capsys):
    spec = parse_spec(
        {
            "name": "flaky",
            "dataset": "digits",
            "loss": "jal_ce",
            "executor": "local",
            "noise": {"symmetric": [0.4]},
            "space": {"alpha": {"choice": [ONCE, 3.0, ALWAYS]}},
            "budget": {"trials": 3, "epochs": EPOCHS},
            "searcher": {"type": "grid"},
            "scheduler": {"type": "none"},
            "max_failures": 1,
        },  # fmt: skip
        where="spec",
    )
    plans = plan(spec)
    counts = {p.name: trials_per_setting(spec, p.space) for p in plans}
    failed = local_search.run_search(spec, plans, str(tmp_path), counts, slots=2, train=flaky)
    by_alpha = {t.config["alpha"]: t for t in read_trials(tmp_path, plans[0].name, {})}
    assert failed == {
        plans[0].name: [{"trial_id": by_alpha[ALWAYS].trial_id, "error": "RuntimeError: boom"}]
    }
    # The one that failed once: epochs 1-2 from its first start, 3-4 from its checkpoint.
    again = by_alpha[ONCE].history
    assert [(r["epoch"], r["start"]) for r in again] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert "RuntimeError: flaky; again from its last checkpoint" in capsys.readouterr().out
    states = study_states(tmp_path / plans[0].name)
    assert states[by_alpha[ALWAYS].trial_id] == "RUNNING"  # not told: a resume runs it again
    assert sorted(states.values()) == ["COMPLETE", "COMPLETE", "RUNNING"]

    # The resume: the failed trial, and nothing else, runs again (under its own name).
    assert local_search.run_search(
        spec, plans, str(tmp_path), counts, slots=2, train=scripted.scripted_trial
    ) == {plans[0].name: []}
    after = {t.config["alpha"]: t for t in read_trials(tmp_path, plans[0].name, {})}
    assert after.keys() == by_alpha.keys() and len(after[ALWAYS].history) == EPOCHS
    assert after[3.0].history == by_alpha[3.0].history  # finished trials are not rerun
    assert sorted(study_states(tmp_path / plans[0].name).values()) == ["COMPLETE"] * 3


@pytest.mark.parametrize("slots", [0, 1])
def test_slots_follow_the_cpus_and_refuse_a_trial_larger_than_the_machine(slots):
    raw = {
        "name": "s", "dataset": "digits", "loss": "jal_ce", "executor": "local",
        "noise": {"symmetric": [0.4]}, "budget": {"trials": 2, "epochs": 1},
        "resources": {"cpus_per_trial": 2}, "scheduler": {"type": "none"},
    }  # fmt: skip
    if slots:
        raw["max_concurrent_trials"] = slots
    spec = parse_spec(raw, where="spec")
    assert local_search.slots(spec, 5) == (slots or 2)
    with pytest.raises(UserError, match="cpus_per_trial: 2 exceeds this machine's 1 CPUs"):
        local_search.slots(spec, 1)


FREE_AND_AGAIN = """
import resource, sys
from jal_search.train import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()

def step():  # a step's activations: 30 buffers of 1 MiB, written, then freed
    buffers = [bytearray(b"x") * (1 << 20) for _ in range(30)]
    del buffers

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_driver_keeps_freed_memory_as_ray_trial_processes_do():
    # What MALLOC_*_THRESHOLD_ gives Ray's trial processes (tune_adapter.MALLOC_ENV), set in a
    # running process: glibc no longer hands a step's freed buffers back to the OS, so the next
    # step does not page-fault them in again (which glibc's own defaults do here, every step).
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", FREE_AND_AGAIN, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    default, kept = faults("default"), faults("kept")
    assert default > 20 * 1000  # ~30 MiB of 4 KiB pages, faulted in again at each of 20 steps
    assert kept < default / 20
