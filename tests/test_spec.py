"""Search specs: the shipped ones validate; bad ones fail with one line naming the field, exit 2."""

import subprocess
import sys

import pytest
import yaml

from jal_search.cli import main
from jal_search.spec import load_spec, plan, shipped_specs

GOOD = {
    "name": "t",
    "dataset": "digits",
    "loss": "jal_ce",
    "noise": {"symmetric": [0.4]},
    "space": {"alpha": {"loguniform": [0.3, 100]}, "a": {"loguniform": [2, 60]}},
    "budget": {"trials": 2, "epochs": 2},
}


def write(tmp_path, spec):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec) if isinstance(spec, dict) else spec)
    return path


def test_every_shipped_spec_validates():
    assert {"quick", "smoke"} <= set(shipped_specs())
    for name in shipped_specs():
        assert plan(load_spec(name)), name


def test_amse_bound_narrows_the_space_of_a(tmp_path):
    spec = load_spec(write(tmp_path, {**GOOD, "noise": {"symmetric": [0.8]}, "space": {
        "a": {"loguniform": [2, 60]}}}))  # fmt: skip
    (p,) = plan(spec)
    assert p.a_min == pytest.approx(9.0)  # K=10, 80% symmetric noise (SPEC §2.4)
    assert p.space["a"].loguniform == (pytest.approx(9.0), 60)
    flagged = load_spec(
        write(tmp_path, {**GOOD, "noise": {"symmetric": [0.8]}, "amse_bound": "flag"})
    )
    assert plan(flagged)[0].space["a"].loguniform == (2, 60)


def test_the_papers_config_is_evaluated_first_when_inside_the_space(tmp_path):
    (p,) = plan(load_spec(write(tmp_path, GOOD)))
    assert p.points_to_evaluate == [{"alpha": 1.0, "a": 30.0}]
    narrow = {**GOOD, "space": {"a": {"uniform": [40, 50]}}}
    assert plan(load_spec(write(tmp_path, narrow)))[0].points_to_evaluate == []


def test_a_search_evaluates_the_test_set_at_its_rungs_unless_asked_for_every_epoch(tmp_path):
    asha = {**GOOD, "budget": {"trials": 2, "epochs": 8}}  # grace 1, rf 6 (the default): 1, 6
    assert plan(load_spec(write(tmp_path, asha)))[0].base.test_epochs == (1, 6)
    unscheduled = {**asha, "scheduler": {"type": "none"}}  # the last epoch only
    assert plan(load_spec(write(tmp_path, unscheduled)))[0].base.test_epochs == ()
    every = {**asha, "test_eval": "every_epoch"}
    assert plan(load_spec(write(tmp_path, every)))[0].base.test_epochs is None


def test_a_trial_config_applies_the_sampled_point():
    (p,) = plan(load_spec("smoke"))[:1]
    cfg = p.trial({"alpha": 2.0, "beta": 0.5, "a": 12.0}).resolve()
    assert cfg.loss_params == {"alpha": 2.0, "beta": 0.5, "a": 12.0}
    assert cfg.epochs == 4 and cfg.noise_type == "symmetric" and cfg.threads == 1


BAD = [
    ({**GOOD, "colour": 1}, "spec.yaml.colour: Extra inputs are not permitted"),
    ({**GOOD, "loss": "nope"}, "unknown loss 'nope'"),
    ({**GOOD, "dataset": "svhn"}, "dataset: no training profile for 'svhn'"),
    ({**GOOD, "noise": {"symmetric": [1.5]}}, "symmetric"),
    ({**GOOD, "noise": {"gaussian": [0.2]}}, "gaussian"),
    ({**GOOD, "noise": {"symmetric": []}}, "noise.symmetric: empty list"),
    ({**GOOD, "noise": {}}, "spec.yaml.noise"),
    (
        {**GOOD, "space": {"b": {"uniform": [0, 1]}}},
        "space.b: loss 'nceandamse' has no parameter 'b'",
    ),
    ({**GOOD, "space": {"a": {"uniform": [3, 1]}}}, "low < high"),
    ({**GOOD, "space": {"a": {"loguniform": [0, 1]}}}, "positive low bound"),
    ({**GOOD, "space": {"a": {"uniform": [1, 2], "fixed": 3}}}, "exactly one of"),
    (
        {**GOOD, "space": {"a": {"uniform": [1, 5]}}, "noise": {"symmetric": [0.8]}},
        "below AMSE's bound 9",
    ),
    ({**GOOD, "space": {"a": 2}, "noise": {"symmetric": [0.8]}}, "fixed a=2 is below AMSE's bound"),
    ({**GOOD, "noise": {"symmetric": [0.95]}}, "no value of AMSE's `a` is noise-tolerant"),
    ({**GOOD, "budget": {"trials": 0, "epochs": 2}}, "spec.yaml.budget.trials"),
    ({**GOOD, "scheduler": {"grace_period": 5}}, "grace_period (5) exceeds budget.epochs (2)"),
    ({**GOOD, "resources": {"gpus_per_trial": 0.3}}, "GPU fraction must be 1/k"),
    ({**GOOD, "searcher": {"type": "grid"}}, "grid search needs `choice` or `fixed`"),
    ({**GOOD, "name": "bad name/x"}, "spec.yaml.name"),
    ({**GOOD, "training": {"epochs": 3}}, "training.epochs: set this with the spec's own key"),
    ({**GOOD, "training": {"lr": -1}}, "spec.lr"),
    ({**GOOD, "training": {"test_epochs": [1]}}, "training.test_epochs: set the spec's test_eval"),
    ({**GOOD, "test_eval": "sometimes"}, "spec.yaml.test_eval"),
    ({**GOOD, "val_fraction": 0}, "spec.yaml.val_fraction"),
    ({**GOOD, "tracking_uri": "http://bob:pw@host:5000"}, "set MLFLOW_TRACKING_USERNAME"),
    ("name: [unclosed", "not valid YAML at line 1"),
    ("- just\n- a list\n", "a spec must be a YAML mapping"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_specs_exit_2_with_one_line(tmp_path, capsys, spec, message):
    assert main(["validate", str(write(tmp_path, spec))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jal-search: error: ") and err.count("\n") == 1, err
    assert message in err


def test_a_missing_spec_lists_the_shipped_ones(capsys):
    assert main(["validate", "no-such-spec"]) == 2
    assert "shipped: " in capsys.readouterr().err


def test_the_real_process_exits_2_without_a_traceback(tmp_path):
    path = write(tmp_path, {**GOOD, "loss": "nope"})
    out = subprocess.run(
        [sys.executable, "-m", "jal_search.cli", "validate", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "unknown loss 'nope'" in out.stderr


def test_extends_merges_mappings_and_replaces_the_space(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({**GOOD, "budget": {"trials": 5, "epochs": 3}})
    )
    space = {"q": {"uniform": [0.1, 1]}}
    child = {
        "extends": "base.yaml",
        "name": "child",
        "loss": "gce",
        "space": space,
        "budget": {"trials": 2},
    }
    spec = load_spec(write(tmp_path, child))
    assert (spec.name, spec.loss, spec.dataset) == ("child", "gce", "digits")
    assert (spec.budget.trials, spec.budget.epochs) == (2, 3)  # merged key by key
    assert set(spec.space) == {"q"}  # replaced whole: no alpha/a left over from the base
    assert load_spec("cifar10_jal_fl").loss == "jal_fl"  # a shipped chain of two


def test_extends_cycles_and_missing_bases_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    assert main(["validate", str(tmp_path / "a.yaml")]) == 2
    assert "`extends` forms a cycle" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    assert "spec 'nowhere': no such file" in capsys.readouterr().err


def test_a_missing_dataset_folder_stops_the_run_before_anything_is_written(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["run", "cifar10_jal_ce", "--storage-path", str(runs), "--data-root", str(tmp_path)]
    assert main(argv) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert not runs.exists()


def test_a_data_root_under_home_is_expanded_and_numbers_may_be_ints_or_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    # YAML 1.1 reads `1e-1` (no dot) as text: still a number for a float field
    spec = {**GOOD, "data_root": "~/data", "val_fraction": "1e-1"}
    loaded = load_spec(write(tmp_path, {**spec, "space": {"alpha": {"uniform": [1, 9]}}}))
    assert loaded.data_root == str(tmp_path / "data")
    assert loaded.space["alpha"].uniform == (1.0, 9.0) and loaded.val_fraction == 0.1
