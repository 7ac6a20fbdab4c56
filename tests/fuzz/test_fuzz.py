"""A small seeded run of the input fuzzer (benchmarks/fuzz_inputs.py; its full run's counts are in
benchmarks/README.md): every generated spec, export, label file and argument vector exits 0 or 2
with one line, without a traceback, within 1 GiB and 5 s, writing nothing."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_inputs.py"


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = module  # its cases are pickled to the worker and back
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzzer()
set_hypothesis_home_dir(Path(os.environ["JAL_SEARCH_CACHE"]) / "hypothesis")  # not ./.hypothesis


@pytest.fixture(scope="module")
def runner():
    runner = fuzz.Runner()
    yield runner
    runner.close()


@settings(
    max_examples=300,
    derandomize=True,  # seeded: the same inputs on every run
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(case=fuzz.any_case())
def test_every_input_exits_0_or_2_within_bounds(runner, case):
    result = runner.run(case)
    assert result.outcome in fuzz.ACCEPTED, (case.family, case.argv, result.detail)


def test_the_script_reports_counts_by_outcome(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--short", "--inputs", "60"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for outcome in fuzz.OUTCOMES:
        assert f"\n  {outcome} " in out.stdout, outcome
    assert "ratio inputs not exiting 0 or 2 / inputs: 0.000 (target <= 0: met)" in out.stdout
    assert list(tmp_path.iterdir()) == []
