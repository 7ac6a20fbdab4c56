"""The bad-input corpus: every mistake is refused by the real `jal-search` command with one
line that names the problem (and, where there is one, the fix), exit code 2, no traceback, and
nothing written: no storage folder, no MLflow database, nothing in the working directory.

Cases:
- specs/*.yaml: search specs, each with its expected message on a first `# expect:` line,
  given to `jal-search run` (one that sets no storage_path gets --storage-path TMP/store);
- exports/*: exported configs edited by hand, given to `jal-search train --config` (JSON ones,
  which cannot hold a comment, expect what JSON_EXPECT says);
- DATA_CASES: dataset folders, label files and hostile documents, built here because their
  validity depends on sizes or bytes (wrong layout, corrupt IDX and pickle, label files of the
  wrong length or range, random bytes, nesting 10^5 deep, FIFOs);
- CLI_CASES: bad arguments to the verbs.
Most cases run in-process (`cli.main`, stderr captured); SUBPROCESS_CASES rerun a few as
separate processes to prove that the process itself prints no traceback, and the hand-found
hostile documents (alias bombs, random bytes) run as processes whose peak memory is measured.
tests/fuzz/ generates thousands more.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from jal_search import noise
from jal_search.cli import main
from jal_search.data import IDX_FILES, load_dataset
from jal_search.errors import UserError

CORPUS = Path(__file__).resolve().parent
SPECS = sorted((CORPUS / "specs").glob("*.yaml"))
EXPORTS = sorted((CORPUS / "exports").glob("*"))
PREFIX = "jal-search: error: "
RAY_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(INFO|WARNING) \S+\.py:\d+ -- ")


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    return first.removeprefix("# expect: ") if first.startswith("# expect: ") else ""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A clean working directory and a storage path that must never appear."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def refused(argv: list[str], sandbox: Path, capsys) -> str:
    """Run the command; check the refusal contract; return its message."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, (argv, captured.err[-2000:])
    assert lines and lines[-1].startswith(PREFIX), captured.err
    # Refusals that need the cluster's size (resources) come after Ray started and logged.
    assert all(RAY_LOG.match(line) for line in lines[:-1]), captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (sandbox / "store").exists()  # no experiment folder, no mlflow.db
    assert list((sandbox / "cwd").iterdir()) == []  # no ./jal_results, ./mlruns, mlflow.db
    return lines[-1].removeprefix(PREFIX)


def run_spec(spec: Path, sandbox: Path) -> list[str]:
    argv = ["run", str(spec), "--num-cpus", "2"]
    if "storage_path:" not in spec.read_text():
        argv += ["--storage-path", str(sandbox / "store")]
    return argv


# Refused only once Ray runs (the check needs the cluster's size): a process each, so that Ray's
# loggers never outlive the test that started them.
NEEDS_RAY = {"cpus_beyond_cluster", "gpus_without_gpu"}


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_bad_spec(spec, sandbox, capsys):
    expected = expectation(spec)
    assert expected, f"{spec.name}: first line must be `# expect: <message part>`"
    if spec.stem in NEEDS_RAY:
        assert expected in refused_by_process(run_spec(spec, sandbox), sandbox, ray_logs=True)
    else:
        assert expected in refused(run_spec(spec, sandbox), sandbox, capsys)


JSON_EXPECT = {
    "not_json.json": "not_json.json: not valid JSON at line 1",
    "nan.json": "nan.json: NaN is not a JSON number; write a finite number",
    "duplicate_key.json": "duplicate_key.json: key 'config' appears twice; keep one",
    "deep.json": "deep.json: nested deeper than 20 levels",
}


@pytest.mark.parametrize("export", EXPORTS, ids=[p.name for p in EXPORTS])
def test_hand_edited_export(export, sandbox, capsys):
    expected = JSON_EXPECT[export.name] if export.suffix == ".json" else expectation(export)
    message = refused(["train", "--config", str(export), "--epochs", "1"], sandbox, capsys)
    assert expected in message


# ------------------------------------------------------------------------- dataset folders
def idx(shape: tuple[int, ...], values: bytes | None = None, magic: bytes = b"") -> bytes:
    """An IDX file of unsigned bytes (see data.read_idx); `values` default to zeros."""
    header = magic or bytes([0, 0, 8, len(shape)])
    body = values if values is not None else bytes(math.prod(shape))
    return header + struct.pack(f">{len(shape)}I", *shape) + body


def mnist_folder(root: Path, broken: dict[str, bytes]) -> Path:
    """torchvision's MNIST layout with tiny valid files, some replaced by `broken`."""
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    good = {
        IDX_FILES[0]: idx((20, 28, 28)),
        IDX_FILES[1]: idx((20,), bytes(range(10)) * 2),
        IDX_FILES[2]: idx((10, 28, 28)),
        IDX_FILES[3]: idx((10,), bytes(range(10))),
    }
    for name, content in {**good, **broken}.items():
        (raw / name).write_bytes(content)
    return root / "mnist"


def digits_labels() -> list[int]:
    return load_dataset("digits").train_labels.tolist()


def spec_with(tmp: Path, **fields) -> Path:
    spec = {
        "name": "data",
        "dataset": "digits",
        "loss": "jal_ce",
        "noise": {"symmetric": [0.4]},
        "budget": {"trials": 1, "epochs": 1},
        **fields,
    }
    path = tmp / "data.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dependent(tmp: Path, labels: object, name: str = "labels.json") -> Path:
    """A spec with dependent noise read from a label file holding `labels`."""
    file = tmp / name
    file.write_text(json.dumps(labels)) if name.endswith(".json") else file.write_bytes(labels)
    return spec_with(tmp, noise={"dependent": [0.4]}, noise_files={"dependent-0.4": str(file)})


def cifar(tmp: Path, batch: bytes | None) -> Path:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    if batch is not None:
        (folder / "data_batch_1").write_bytes(batch)
    return spec_with(tmp, dataset="cifar10", data_root=str(tmp / "cifar"))


# Each builds its input under the sandbox and returns (argv, the message part that must appear).
DATA_CASES: dict[str, Callable[[Path], tuple[list[str], str]]] = {}


def case(build: Callable[[Path], tuple[list[str], str]]) -> Callable:
    DATA_CASES[build.__name__] = build
    return build


def train_mnist(root: Path) -> list[str]:
    return ["train", "--dataset", "mnist", "--data-root", str(root), "--epochs", "1"]


def run(spec: Path, t: Path) -> list[str]:
    return ["run", str(spec), "--storage-path", str(t / "store")]


@case
def local_search_given_an_address(t):
    spec = spec_with(t, executor="local", scheduler={"type": "none"})
    return [*run(spec, t), "--address", "127.0.0.1:9"], "--address: the spec's executor is local"


@case
def missing_data_root(t):
    return train_mnist(t / "nowhere"), f"{t / 'nowhere/MNIST/raw' / IDX_FILES[0]}[.gz] not found"


@case
def data_root_is_a_file(t):
    (t / "cifar.tar").write_bytes(b"not a folder")
    return run(spec_with(t, dataset="cifar10", data_root=str(t / "cifar.tar")), t), "cifar.tar"


@case
def cifar_wrong_layout(t):
    return run(cifar(t, None), t), "cifar-10-batches-py/data_batch_1 not found"


@case
def cifar_corrupt_pickle(t):
    return run(cifar(t, b"\x80\x04not a pickle"), t), "data_batch_1"


@case
def cifar_pickle_of_code(t):
    return run(cifar(t, pickle.dumps(os.system)), t), "refusing to unpickle posix.system"


@case
def mnist_idx_bad_magic(t):
    bad = idx((20, 28, 28), magic=b"\x00\x00\x0d\x03")  # 0x0d: floats, not unsigned bytes
    return train_mnist(mnist_folder(t, {IDX_FILES[0]: bad})), f"{IDX_FILES[0]}: wrong magic"


@case
def mnist_idx_truncated(t):
    whole = idx((10, 28, 28))
    folder = mnist_folder(t, {IDX_FILES[2]: whole[:-100]})
    return train_mnist(folder), f"{IDX_FILES[2]}: {len(whole) - 100} bytes, expected {len(whole)}"


@case
def mnist_labels_out_of_range(t):
    folder = mnist_folder(t, {IDX_FILES[1]: idx((20,), bytes([12]) * 20)})
    return train_mnist(folder), "has labels outside 0..9"


@case
def mnist_images_and_labels_disagree(t):
    folder = mnist_folder(t, {IDX_FILES[1]: idx((19,), bytes(19))})
    return train_mnist(folder), "holds 20 images but 19 labels"


@case
def label_file_missing(t):
    gone = t / "gone.json"
    spec = spec_with(t, noise={"dependent": [0.4]}, noise_files={"dependent-0.4": str(gone)})
    return run(spec, t), f"label_file {gone}: no such file"


@case
def label_file_wrong_length(t):
    return run(dependent(t, [0, 1, 2]), t), "has shape (3,); expected a 1-D vector of"


@case
def label_file_out_of_range(t):
    return run(dependent(t, [12] * len(digits_labels())), t), "labels span [12, 12]"


@case
def label_file_not_integers(t):
    return run(dependent(t, [0.5] * len(digits_labels())), t), "float64 values"


@case
def label_file_bad_extension(t):
    return run(dependent(t, b"1,2,3", "labels.csv"), t), "unsupported extension '.csv'"


@case
def label_file_corrupt_npy(t):
    return run(dependent(t, b"[0, 1,", "labels.npy"), t), "labels.npy: cannot read it"


def dependent_bytes(tmp: Path, content: bytes, name: str) -> Path:
    """`dependent` for a label file of raw bytes."""
    (tmp / name).write_bytes(content)
    files = {"dependent-0.4": str(tmp / name)}
    return spec_with(tmp, noise={"dependent": [0.4]}, noise_files=files)


@case
def label_file_duplicate_key(t):
    sets = b'{"worse_label": [1, 2], "worse_label": [3, 4]}'
    return run(dependent_bytes(t, sets, "labels.json"), t), "key 'worse_label' appears twice"


@case
def label_file_nested_deep(t):
    return run(dependent_bytes(t, b"[" * 100_000, "labels.json"), t), "JSON nested too deep"


@case
def label_file_npy_header_lies(t):
    header = "{'descr': '<i8', 'fortran_order': False, 'shape': (10000000000000,), }".ljust(117)
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.encode() + b"\n" + bytes(16)
    return run(dependent_bytes(t, npy, "labels.npy"), t), "labels.npy: cannot read it"


# Hostile documents, as the hand-found ones of issue 12 (the rest are corpus files above).
def random_bytes(t: Path, name: str) -> Path:
    path = t / name
    path.write_bytes(random.Random(12).randbytes(4096))
    return path


@case
def spec_random_bytes(t):
    return run(random_bytes(t, "spec.yaml"), t), "spec.yaml: not UTF-8 text (byte 0)"


@case
def export_random_bytes(t):
    path = random_bytes(t, "best.yaml")
    return ["train", "--config", str(path)], f"{path}: not UTF-8 text (byte 0)"


@case
def spec_nested_deep(t):
    (t / "deep.yaml").write_text("name: " + "[" * 100_000)
    return run(t / "deep.yaml", t), "deep.yaml: nested deeper than 20 levels (line 1)"


@case
def spec_over_a_mebibyte(t):
    (t / "big.yaml").write_text("# a comment\n" * 100_000)
    return run(t / "big.yaml", t), "big.yaml: over 1,048,576 bytes; is it the right file?"


@case
def export_is_a_fifo(t):
    os.mkfifo(t / "best.yaml")  # reading it would wait for a writer forever
    return ["train", "--config", str(t / "best.yaml")], "best.yaml is not a regular file"


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(case, sandbox, capsys):
    argv, expected = DATA_CASES[case](sandbox)
    assert expected in refused(argv, sandbox, capsys)


# ---------------------------------------------------------------------------- CLI arguments
CLI_CASES: dict[str, tuple[list[str], str]] = {
    "unknown_verb": (["launch"], "invalid choice: 'launch'"),
    "no_such_spec": (["run", "no_such_spec.yaml"], "spec 'no_such_spec.yaml': no such file"),
    "num_cpus_not_a_number": (["run", "smoke", "--num-cpus", "two"], "invalid int value: 'two'"),
    "resume_nothing": (["resume", "nowhere"], "experiment 'nowhere': no experiment.json found"),
    "results_nothing": (["results", "nowhere"], "no experiment.json found"),
    "sync_nothing": (["sync", "nowhere"], "no experiment.json found"),
    "bad_scope": (["results", "nowhere", "--scope", "best"], "invalid choice: 'best'"),
    "evaluate_zero_seeds": (["evaluate", "nowhere", "--seeds", "0"], "--seeds: must be at least 1"),
    "export_wrong_suffix": (
        ["export", "nowhere", "--out", "best.txt"],
        "--out: best.txt must end in",
    ),
    "train_unknown_loss": (["train", "--loss", "nope"], "unknown loss 'nope'"),
    "train_val_fraction": (["train", "--val-fraction", "1.5"], "val_fraction"),
    "train_noise_rate_text": (["train", "--noise", "symmetric:abc"], "rate:"),
    "train_noise_without_rate": (["train", "--noise", "asymmetric"], "asymmetric"),
    "train_param_without_value": (["train", "--param", "gamma"], "--param: expected KEY=NUMBER"),
    "train_zero_seeds": (["train", "--seeds", "0"], "--seeds must be at least 1"),
    "train_no_cuda": (["train", "--device", "cuda:0", "--epochs", "1"], "CUDA is not available"),
    "train_config_missing": (["train", "--config", "gone.yaml"], "--config: cannot read gone.yaml"),
    "validate_nothing": (["validate", "nothing.yaml"], "no such file and no shipped spec"),
    "validate_name_too_long": (["validate", "x" * 300], "a path component longer than 255 bytes"),
    "argument_with_nul": (["validate", "quick\0"], "an argument holds a NUL character"),
    "train_data_root_unknown_user": (
        ["train", "--data-root", "~nosuchuser/data"],
        "~nosuchuser: no such user here; give the full path",
    ),
    "train_lr_nan": (["train", "--lr", "nan"], "train.lr: Input should be a finite number"),
    "train_param_infinite": (
        ["train", "--param", "a=inf"],
        "loss_params.a: Input should be a finite",
    ),
    "train_seed_negative": (["train", "--seed", "-3"], "train.seed: Input should be greater than"),
    "run_storage_path_unknown_user": (
        ["run", "smoke", "--storage-path", "~nosuchuser"],
        "~nosuchuser: no such user here",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_arguments(case, sandbox, capsys):
    argv, expected = CLI_CASES[case]
    assert expected in refused(argv, sandbox, capsys)


def refused_by_process(argv: list[str], sandbox: Path, ray_logs: bool = False) -> str:
    """`refused` for a separate `python -m jal_search.cli` process; only the error line on
    stderr unless `ray_logs` (Ray's own start-up lines may precede it)."""
    out = subprocess.run(
        [sys.executable, "-m", "jal_search.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=sandbox / "cwd",
    )
    lines = out.stderr.splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines and lines[-1].startswith(PREFIX), out.stderr
    assert all(ray_logs and RAY_LOG.match(line) for line in lines[:-1]), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (sandbox / "store").exists()
    assert list((sandbox / "cwd").iterdir()) == []
    return lines[-1].removeprefix(PREFIX)


@pytest.mark.parametrize("name", ["not_yaml", "unknown_loss", "a_range_below_amse_bound"])
def test_a_separate_process_prints_only_the_line_and_exits_2(name, sandbox):
    spec = CORPUS / "specs" / f"{name}.yaml"
    message = refused_by_process(run_spec(spec, sandbox), sandbox)
    assert expectation(spec) in message


def test_an_archive_unpacking_beyond_the_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(noise, "MAX_LABEL_FILE_BYTES", 1000)
    file = tmp_path / "labels.npz"
    np.savez_compressed(file, worse_label=np.zeros(200, dtype=np.int64))  # 1,728 bytes unpacked
    with pytest.raises(UserError, match="labels.npz: unpacks to more than 1,000 bytes"):
        noise.corrupt_labels(np.zeros(200, dtype=int), "human", "worst", 10, 0, label_file=file)


def peak_mib(argv: list[str], cwd: Path) -> tuple[float, str]:
    """A `jal-search` process's peak resident memory and its stderr; it must exit 2."""
    err = cwd / "stderr.txt"
    with err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "jal_search.cli", *argv], cwd=cwd, stderr=stderr
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = err.read_text()
    err.unlink()
    assert process.returncode == 2, text
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return usage.ru_maxrss / 1024, text


def test_hostile_documents_exit_2_in_no_more_memory_than_a_plain_mistake(sandbox):
    """Issue 12's hand-found cases as real processes: an alias bomb (9 levels of 9 aliases) once
    aborted the process or ate all memory, and random bytes printed a traceback."""
    cwd = sandbox / "cwd"
    plain, _ = peak_mib(["validate", str(CORPUS / "specs" / "unknown_loss.yaml")], cwd)
    for argv, message in [
        (["validate", str(CORPUS / "specs" / "alias_bomb.yaml")], "more than 10,000 values"),
        (["train", "--config", str(CORPUS / "exports" / "alias_bomb.yaml")], "10,000 values"),
        (["validate", str(random_bytes(sandbox, "spec.yaml"))], "not UTF-8 text"),
    ]:
        peak, text = peak_mib(argv, cwd)
        assert message in text
        assert peak < plain + 100, (argv, peak, plain)
    assert list(cwd.iterdir()) == []


def test_the_corpus_is_large_enough():
    assert len(SPECS) + len(EXPORTS) + len(DATA_CASES) + len(CLI_CASES) >= 40
