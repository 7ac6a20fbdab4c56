"""The `jal-search` command: train without Ray, machine-readable output, listings, errors."""

import json
import subprocess
import sys

from jal_search.cli import main


def jal(*args):
    return subprocess.run(
        [sys.executable, "-m", "jal_search.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_train_json_prints_one_object_per_epoch():
    args = "--dataset digits --noise symmetric:0.4 --loss jal_ce --alpha 2 --beta 0.5 --a 12"
    out = jal("train", *args.split(), "--epochs", "3", "--seed", "5", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_acc", "test_acc", "noisy_fit", "seed"} <= set(rows[0])
    assert all(r["seed"] == 5 for r in rows)
    assert 0.3 < rows[0]["noise_realised"] <= 0.4


def test_train_over_seeds_prints_mean_and_std(capsys):
    assert (
        main(["train", "--dataset", "digits", "--epochs", "1", "--seeds", "2", "--loss", "ce"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("# digits clean ce()") == 2
    assert "final test_acc over 2 seeds:" in out and "±" in out


def test_train_user_errors_exit_2(capsys):
    cases = [
        (["train", "--loss", "nope"], "unknown loss 'nope'"),
        (["train", "--param", "gamma"], "--param: expected KEY=NUMBER"),
        (["train", "--noise", "symmetric"], "symmetric"),
        (["train", "--epochs", "0"], "train.epochs"),
        (["train", "--loss", "gce", "--param", "q=5"], "q"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_list_names_the_registries(capsys):
    assert main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "nceandamse" in out and "alpha=1, beta=1, a=30" in out
    assert main(["list", "noise"]) == 0
    assert "dependent" in capsys.readouterr().out


def test_help_and_spaces_do_not_import_ray_or_mlflow():
    code = (
        "import sys; from jal_search.cli import main; main(['spaces']); "
        "print(sorted({'ray', 'mlflow'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]")
    assert "quick" in out.stdout


def test_the_console_script_exits_with_the_command_s_code_after_the_exit_handlers():
    # `entry` leaves without Python's module teardown: the exit handlers (Ray's shutdown among
    # them) still run, and everything printed reaches the pipe, on success and on a user error.
    code = (
        "import atexit, sys; from jal_search import cli; "
        "atexit.register(print, 'exit handler ran'); cli.entry()"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "list", "losses"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "nceandamse" in ok.stdout
    assert ok.stdout.splitlines()[-1] == "exit handler ran"
    bad = subprocess.run(
        [sys.executable, "-c", code, "list", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("jal-search: error: ")
    assert bad.stdout == "exit handler ran\n"


def test_an_exported_config_reruns_unchanged(tmp_path):
    # `export` → `train --config` reproduces the exported trial: same config, same metrics.
    from fabricate import FakeTrial, fabricate

    from jal_search.config import load_exported
    from jal_search.results import export
    from jal_search.train import run_trial

    path = fabricate(
        tmp_path,
        {"symmetric-0.4": [FakeTrial("t1", {"alpha": 2.0, "beta": 0.5, "a": 12.0}, [0.5, 0.6])]},
    )
    out = export(path, tmp_path / "best.yaml")
    config = load_exported(out, "symmetric-0.4")
    assert config.loss_params["alpha"] == 2.0 and config.loss_params["a"] == 12.0
    short = config.model_copy(update={"epochs": 2})
    expected = run_trial(short).history
    (tmp_path / "short.yaml").write_text(
        out.read_text().replace(f"epochs: {config.epochs}\n", "epochs: 2\n")
    )
    printed = jal(
        "train", "--config", str(tmp_path / "short.yaml"), "--setting", "symmetric-0.4", "--json"
    )
    assert printed.returncode == 0, printed.stderr
    rows = [json.loads(line) for line in printed.stdout.splitlines()]
    assert [r["test_acc"] for r in rows] == [m["test_acc"] for m in expected]


def test_an_error_is_one_line_whatever_the_input_holds(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: t\ndataset: digits\nloss: ce\nnoise: {clean: [0]}\n"
        'budget: {trials: 1, epochs: 1}\n"a\\nb\\u2028c": 1\n'
    )
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a\\nb\\u2028c: Extra inputs are not permitted" in err, err
