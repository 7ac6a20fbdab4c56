"""What two computations of one training share, for the tests that compare them (what holds on
every machine: `jal_search.train`'s docstring): fields rounding cannot reach, exactly; a few
float64 SGD steps, to rounding; many noisy steps, within bands.
"""

import math

import pytest
import torch

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
# Over many noisy steps two computations (a pack and a lone run, two thread counts, two CPU
# models, two formulations) share only the distribution of their results. Measured on digits,
# lr ≤ 0.02, ≤ 3 epochs, 30 seeds per config, runs whose every weight was moved 10 ulps after
# every step (far more than a kernel's rounding) against plain ones: test_acc moved ≤ 0.0056 (2 of
# 360 images), val_acc ≤ 0.0069 (1 of 144), noisy_fit and memorized ≤ 0.005, the epoch's mean
# train_loss ≤ 4e-5 relative. A real mix-up lands outside: half the lr moved test_acc by ≥ 0.089
# in each of 30 runs (3 losses × 10 seeds), another loss moved train_loss by ≥ 58%.
ACC_BAND = 0.05
LOSS_BAND = 1e-3
# Not rounding: must be equal in any layout, on any machine.
EXACT = ("epoch", "lr", "noise_realised", "diverged", "bf16")


def assert_within_rounding(after, reference, before, steps, longest_sum):
    """`after` equals `reference`, float64 weights `steps` SGD steps on from `before`, to rounding.

    Per tensor, with Δ = θ − θ₀ and C = 4 for the error's growth through the layers:
    - float64 rounding: each run sums up to n = `longest_sum` products in its own order, off by
      ≲ eps64·√n of the update (rounding errors add up as a random walk), and stores weights and
      momentum rounded, ≤ ½ ulp ≤ ½·eps64·|θ| per step: eps64·(steps·max|θ| + √n·max|Δ|);
    - float32 on purpose: the loss is float32 in every layout, and a pack holds lr, L1 and weight
      decay as float32 tensors (½ ulp off the Python floats run_trial's SGD uses): eps32·max|Δ|.
    Measured: ≤ 0.46·eps32·max|Δ| over 60 runs, at 1 and 2 threads, and with oneDNN and ATen held
    to AVX2 or SSE4.1 kernels. Integer buffers (BatchNorm's step counts) must be equal.
    """
    assert after.keys() == reference.keys()
    for name, ref in reference.items():
        got, start = after[name], before[name]
        if not ref.is_floating_point():
            assert torch.equal(got, ref), name
            continue
        assert ref.dtype == got.dtype == torch.float64, name
        delta, size = (ref - start).abs().max().item(), ref.abs().max().item()
        tol = 4 * (EPS32 * delta + EPS64 * (steps * size + math.sqrt(longest_sum) * delta))
        torch.testing.assert_close(got, ref, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_course(first, second):
    """Two long noisy runs of one config: equal where rounding cannot reach, within the bands
    elsewhere."""
    assert [set(m) for m in second] == [set(m) for m in first]
    for a, p in zip(first, second, strict=True):
        for key in EXACT:
            assert p[key] == a[key], (a["epoch"], key)
        assert p["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_BAND), a["epoch"]
        for key in ("noisy_fit", "memorized", "val_acc", "test_acc"):
            assert p[key] == pytest.approx(a[key], abs=ACC_BAND, nan_ok=True), (a["epoch"], key)
