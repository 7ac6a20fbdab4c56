"""Security defaults: files from outside are never executed, and no shell runs user input.

Each payload below creates a marker file when unpickled (or YAML-constructed) by an unsafe
loader; each test first shows that the payload is live with that unsafe loader, then that
jal-search refuses the file with a UserError (or, for checkpoints, a CheckpointError that the
trial turns into a restart) and the marker never appears. The CIFAR/MNIST pickles are covered
in tests/test_data.py (restricted unpickler, sha256 before unpickling).
"""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jal_search import noise
from jal_search.cli import main
from jal_search.errors import UserError
from jal_search.spec import load_spec
from jal_search.train import CHECKPOINT_FILE, CheckpointError, load_checkpoint

PACKAGE = Path(__file__).resolve().parents[2] / "jal_search"


class Payload:
    """Unpickling this touches `marker`: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_with_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"epoch": 3, "model": Payload(marker)}, tmp_path / CHECKPOINT_FILE)
    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)  # the unsafe way runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_a_label_file_with_a_pickle_payload_is_refused(tmp_path, suffix):
    marker, path = tmp_path / "pwned", tmp_path / f"labels{suffix}"
    if suffix == ".npy":
        np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
        np.load(path, allow_pickle=True)
    else:
        torch.save({"worse_label": Payload(marker)}, path)
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    kind = "dependent" if suffix == ".npy" else "human"
    rate = 0.4 if kind == "dependent" else "worst"
    with pytest.raises(UserError, match=f"label_file {path}"):
        noise.corrupt_labels(np.zeros(10, dtype=np.int64), kind, rate, 10, seed=0, label_file=path)
    assert not marker.exists()


def test_yaml_tags_in_specs_and_exported_configs_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    tag = f'!!python/object/apply:os.mkdir ["{marker}"]'
    yaml.unsafe_load(tag)
    assert marker.exists()
    marker.rmdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: {tag}\ndataset: digits\nloss: ce\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(spec)
    export = tmp_path / "best.yaml"
    export.write_text(f"settings:\n  clean:\n    config: {tag}\n")
    assert main(["train", "--config", str(export)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_no_shell_and_no_dynamic_code_in_the_package():
    """No `shell=True`, os.system/os.popen, eval/exec or pickle.load(s) anywhere in jal_search/
    (pickles go through data.py's restricted Unpickler subclass only)."""
    found = []
    for source in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            shell = any(
                k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                for k in node.keywords
            )
            banned = name in (
                "os.system",
                "os.popen",
                "eval",
                "exec",
                "pickle.load",
                "pickle.loads",
            )
            if shell or banned:
                found.append(f"{source.name}:{node.lineno}: {name}")
    assert found == []
