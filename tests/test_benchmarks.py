"""The benchmarks run in their short mode and print what README quotes: header and ratio lines.

Speed itself is never asserted: these machines are shared, and a benchmark's figures are for
people to read. What is checked is that each script runs end to end and reports every ratio.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RATIO = re.compile(
    r"^ratio (.+): -?[0-9.]+(?:e[-+]?\d+)? \(target (?:<=|>=) [0-9.]+: (?:met|missed)\)$"
)


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--short", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    name = script.removesuffix(".py")
    assert out.startswith(f"# {name} "), out[:200]
    for fact in ("machine:", "torch ", "mode short"):
        assert fact in out, fact
    return out


def ratios(out: str) -> list[str]:
    return [m.group(1) for line in out.splitlines() if (m := RATIO.match(line))]


def test_loop_vs_reference_reports_speedup_and_floor_ratios_for_both_workloads():
    out = run("loop_vs_reference.py", "--repeats", "2")
    names = ratios(out)
    for workload in ("mnist/cnn_small", "cifar-shaped/cnn_cifar"):
        assert f"{workload} ours/reference samples/s" in names
        assert f"{workload} ours/floor step time" in names


def test_packed_reports_trials_per_hour_and_memory_per_trial():
    out = run("packed.py", "--packs", "2,8", "--repeats", "1")
    assert ratios(out) == [f"packed K={k} / one-per-process trials per CPU-hour" for k in (2, 8)]
    assert out.count("peak MiB") == 4  # start-up, one per process, K=2, K=8


def test_asha_efficiency_reports_epochs_and_gap_against_the_grid():
    out = run("asha_efficiency.py")
    names = ratios(out)
    assert "asha grace=1 rf=6 epochs / grid epochs" in names  # the shipped schedule
    assert "asha grace=1 rf=6 best val_acc gap (points)" in names
    assert "grid best val_acc" in out


def test_asha_efficiency_replays_optunas_rule_too(tmp_path):
    curves = tmp_path / "curves.json"
    out = run("asha_efficiency.py", "--curves", str(curves))  # trains the tiny grid, keeps it
    replays = ("asha_efficiency.py", "--curves", str(curves))
    asha = run(*replays)  # replays only, the same curves
    sh = run("asha_efficiency.py", "--curves", str(curves), "--rule", "successive_halving")
    assert "grid_curves: read from" in asha and "grid_curves: read from" in sh
    assert "successive_halving grace=1 rf=6 epochs / grid epochs" in ratios(sh)
    assert "rule='asha'" in asha and "rule='successive_halving'" in sh  # the replays' setup
    # Replays of the same curves are the same (the rule itself is checked against Optuna's
    # pruner in tests/test_tune_adapter.py).
    table = lambda text: text.split("seeds meeting both")[1]  # noqa: E731
    assert table(asha) == table(out)
    # Every rule on the same seeds: without one, every trial its full budget (8 configs × 4
    # epochs); each rule spends at most that.
    rows = re.findall(r"^\s+1\s+6 (\w+)\s+([\d.]+)\s", run(*replays, "--compare"), re.M)
    epochs = {rule: float(e) for rule, e in rows}
    assert list(epochs) == ["none", "asha", "successive_halving", "asha_after", "paused_halving"]
    assert epochs["none"] == 32.0 and max(epochs.values()) == 32.0 and min(epochs.values()) < 32
    other = subprocess.run(
        [sys.executable, str(BENCHMARKS / "asha_efficiency.py"), "--short", "--noise",
         "asymmetric:0.4", "--curves", str(curves)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert other.returncode != 0 and "not of" in other.stderr  # curves of another setting


def test_eval_cost_reports_the_share_of_an_epoch_without_the_test_set():
    out = run("eval_cost.py", "--repeats", "1")
    assert ratios(out) == ["epoch without the test set / with it"]


@pytest.mark.slow
def test_search_overhead_reports_the_ratio_and_the_start_up_costs():
    out = run("search_overhead.py", "--repeats", "1")
    assert ratios(out) == ["smoke search wall / ideal"]
    assert "ray start-up s:" in out and "actor start-up s" in out


@pytest.mark.slow
def test_driver_scale_reports_the_driver_cost_per_trial_at_each_size():
    out = run("driver_scale.py")
    scale = "40 / 10 trials"
    assert ratios(out) == [
        f"driver CPU per trial {scale}",
        f"bytes written per trial {scale}",
        f"wall beyond the ideal per trial {scale}",
    ]
    assert re.search(r"^ +10 trials: wall", out, re.M) and re.search(r"^ +40 trials:", out, re.M)


@pytest.mark.slow
def test_packed_search_reports_searches_per_hour_and_the_best_found():
    out = run("packed_search.py")
    assert ratios(out) == ["smoke searches per hour, pack 2 / unpacked"]
    assert re.search(r"^seed 0 pack 2 +wall .* best val_acc: asymmetric-0.2 0\.\d+", out, re.M)
    assert "largest gap in mean best val_acc, pack 2 vs unpacked" in out


@pytest.mark.slow
def test_vs_peers_reports_each_arm_and_the_wall_ratios_to_plain_optuna_and_stock_tune():
    out = run("vs_peers.py")
    ours = ("jal-search", "jal-search ray", "jal-search asha", "jal-search pack 2")
    assert ratios(out) == [
        f"smoke wall {arm} / {peer}" for arm in ours for peer in ("plain Optuna", "stock Tune")
    ]
    for arm in (*ours, "stock Tune", "plain Optuna"):
        per_seed = rf"^seed 0 {arm} +wall .* epochs +\d+ +wall per epoch .* best val_acc: asym"
        assert re.search(per_seed, out, re.M), arm
        assert re.search(rf"^{arm} +wall .* s, epochs .* mean best val_acc: asym", out, re.M), arm
    assert "largest gap in mean best val_acc, plain Optuna vs jal-search" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what gpu.py does without CUDA")
def test_gpu_says_at_once_that_it_needs_cuda():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (
        "gpu.py: no CUDA device here, nothing measured; run it on a GPU machine"
    )


def test_gpu_arms_run_their_code_path_on_a_cpu():
    # Step arms: three models (tiny batches, fp32 only on a CPU); the embedded default's epochs
    # through run_trial; evaluation at three batch sizes; then the recorded stream of a real
    # search through one trial at a time and a pack of 2.
    out = run("gpu.py", "--device", "cpu")
    models = ("cnn_small", "cnn_cifar", "resnet34_cifar")
    assert ratios(out) == [
        "cnn_small fp32 our loop / graphed floor step time",
        "cnn_small our loop step ms, faster precision",
        "cnn_cifar fp32 our loop / graphed floor step time",
        "cnn_cifar our loop step ms, faster precision",
        "resnet34_cifar fp32 our loop / graphed floor step time",
        "embedded default epoch s after the first, graphed",
        "embedded default epoch time, eager / graphed",
        "search trials per hour, pack 2 / one at a time",
    ]
    for m in models:
        assert re.search(rf"^step {m} fp32 batch 8: eager .* ms, graphed .* our loop ", out, re.M)
    for arm in ("graphed", "eager"):
        assert re.search(rf"^epoch {arm} seed 1: embedded default, seconds per epoch ", out, re.M)
    assert re.search(r"^epoch test_acc over seeds \[1\]: graphed mean .* eager range ", out, re.M)
    assert len(re.findall(r"^eval cnn_small, 1000 images, batch \d+: [0-9.]+ ms$", out, re.M)) == 3
    assert re.search(r"^search one at a time: 4 trials in .* best val_acc of completed", out, re.M)
    assert re.search(r"^search pack 2: 8 trials in ", out, re.M)
