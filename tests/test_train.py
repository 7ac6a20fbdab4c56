"""The training loop: it learns, it resumes exactly, it stops diverged runs, it stays Ray-free."""

import copy
import math
import subprocess
import sys

import pytest
import torch

import jal_search.train
from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.losses import build_loss
from jal_search.models import build_model
from jal_search.profiles import get_profile
from jal_search.train import (
    CheckpointError,
    EpochSums,
    check_precision,
    fast_bf16,
    load_checkpoint,
    make_scheduler,
    pick_device,
    prepare_data,
    run_trial,
    save_checkpoint,
    train_step,
)

DIGITS = dict(dataset="digits", epochs=4, seed=7)


def test_learns_digits_with_the_jal_loss():
    result = run_trial(TrialConfig(**DIGITS, loss="jal_ce", noise_type="clean"))
    assert result.status == "completed"
    assert [m["epoch"] for m in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["test_acc"] > 0.85
    assert result.history[-1]["val_acc"] > 0.85
    assert math.isnan(result.history[-1]["memorized"])  # no wrong labels to memorise


def test_resume_from_a_checkpoint_continues_exactly():
    config = TrialConfig(**DIGITS, loss="gce", noise_type="symmetric", noise_rate=0.4)
    states = []
    # The state aliases the live model (saving it is the hook's job), so keep a copy.
    straight = run_trial(config, report=lambda metrics, state: states.append(copy.deepcopy(state)))
    resumed = run_trial(config, resume=states[1])  # the state after epoch 2
    assert len(resumed.history) == 4  # the first two come from the checkpoint
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "val_acc", "test_acc", "noisy_fit"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_resume_refuses_a_checkpoint_of_other_noisy_labels():
    states = []
    run_trial(
        TrialConfig(**DIGITS, noise_type="symmetric", noise_rate=0.2),
        report=lambda m, s: states.append(s),
    )
    other = TrialConfig(**DIGITS, noise_type="symmetric", noise_rate=0.4)
    with pytest.raises(UserError, match="different noisy labels"):
        run_trial(other, resume=states[0])


def test_a_diverged_loss_ends_the_trial_with_its_status():
    result = run_trial(TrialConfig(dataset="digits", loss="ce", lr=1e6, epochs=3))
    assert result.status == "diverged"
    assert len(result.history) < 3
    assert result.history[-1]["diverged"] == 1.0
    assert math.isnan(result.history[-1]["val_acc"])  # never a candidate for "best"


def test_validation_labels_are_noisy_unless_asked_clean():
    base = dict(DIGITS, loss="ce", noise_type="symmetric", noise_rate=0.6)
    noisy = run_trial(TrialConfig(**base, val_labels="noisy")).history[-1]
    clean = run_trial(TrialConfig(**base, val_labels="clean")).history[-1]
    # Same seed, same training: only the labels the held-out images are scored against differ.
    assert noisy["test_acc"] == clean["test_acc"]
    assert clean["val_acc"] > noisy["val_acc"] + 0.2


def test_noisy_labels_are_built_once_per_setting_and_hashed():
    config = TrialConfig(**DIGITS, noise_type="symmetric", noise_rate=0.4).resolve()
    data = prepare_data(config)
    assert prepare_data(config) is data  # reused processes do not rebuild the noise
    wrong = (data.noisy_labels != data.clean_labels).float().mean().item()
    assert wrong == pytest.approx(data.noise_rate)
    assert 0.3 < wrong <= 0.4
    assert len(set(data.train_idx) & set(data.val_idx)) == 0
    other = prepare_data(config.model_copy(update={"noise_seed": 99}))
    assert other.label_hash != data.label_hash


def test_checkpoint_round_trip_and_truncation(tmp_path):
    state = {
        "epoch": 3,
        "model": {"w": torch.arange(4.0)},
        "label_hash": "ab",
        "history": [{"a": 1.0}],
    }
    save_checkpoint(state, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    path = tmp_path / "state.pt"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_device_is_cpu_without_cuda():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")


def test_the_loop_imports_neither_ray_nor_mlflow():
    code = "import sys, jal_search.train; print(sorted({'ray', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _old_style_step(model, loss_fn, optimizer, images, labels, l1, grad_clip, sums, bf16=False):
    """run_trial's step before train_step: L1 as a term of the loss, as upstream adds it."""
    noisy, clean = labels[:, 0], labels[:, 1]
    logits = model(images)
    loss = loss_fn(logits, noisy)
    objective = loss + l1 * sum(p.abs().sum() for p in model.parameters()) if l1 else loss
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    sums.add(logits, loss, noisy, clean)


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1, 8)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(32, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (32, 2), generator=g)
    return model, images, labels


@pytest.mark.parametrize("grad_clip", [None, 5.0])
def test_l1_as_a_gradient_equals_the_l1_term_in_the_loss(grad_clip):
    l1 = 1e-2  # large enough that its share of the gradient is plain to see
    loss_fn = build_loss("jal_ce", 10, alpha=1.0, beta=1.0, a=30.0)
    grads, losses = {}, {}
    for name, step, weight in (
        ("new", train_step, l1),
        ("old", _old_style_step, l1),
        ("no_l1", train_step, 0.0),
    ):
        model, images, labels = _model_and_batch()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps θ: grads stay comparable
        sums = EpochSums.zeros(torch.device("cpu"))
        step(model, loss_fn, optimizer, images, labels, weight, grad_clip, sums)
        grads[name] = [p.grad.clone() for p in model.parameters()]
        losses[name] = sums.loss.item()
    for new, old in zip(grads["new"], grads["old"], strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7)
    pairs = zip(grads["new"], grads["no_l1"], strict=True)
    change = max((new - bare).abs().max().item() for new, bare in pairs)
    assert change > 1e-3  # the L1 gradient is there (this test would see it missing)
    # The reported loss is the loss alone, without the L1 term, in both formulations.
    assert losses["new"] == pytest.approx(losses["old"], rel=1e-6)
    assert losses["new"] == pytest.approx(losses["no_l1"], rel=1e-6)


def test_run_trial_history_matches_the_old_l1_formulation(monkeypatch):
    config = TrialConfig(
        **dict(DIGITS, epochs=3), loss="jal_ce", noise_type="symmetric", noise_rate=0.4, l1=1e-3
    )
    new = run_trial(config).history
    monkeypatch.setattr(jal_search.train, "train_step", _old_style_step)
    old = run_trial(config).history
    assert len(new) == len(old) == 3
    for a, b in zip(new, old, strict=True):
        for key in ("train_loss", "noisy_fit", "memorized", "val_acc", "test_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)


def test_the_scheduler_follows_the_profile():
    def rates(dataset, epochs):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = make_scheduler(optimizer, get_profile(dataset), epochs)
        out = []
        for _ in range(epochs):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    cosine = [(1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert rates("mnist", 4) == pytest.approx(cosine)
    assert rates("webvision", 3) == pytest.approx([1.0, 0.97, 0.97**2])  # step 1, gamma 0.97
    assert rates("clothing1m", 7) == pytest.approx([1.0] * 5 + [0.1] * 2)  # step 5, gamma 0.1


def test_bf16_runs_the_convolutions_in_bf16_and_keeps_the_loss_in_fp32():
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1, 28)
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    losses = []

    def loss_fn(logits, target):
        losses.append(logits.dtype)
        return torch.nn.functional.cross_entropy(logits, target)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8, 2))
    for bf16, expected in ((False, torch.float32), (True, torch.bfloat16)):
        seen.clear()
        train_step(model, loss_fn, optimizer, images, labels, 0.0, None, EpochSums.zeros(
            torch.device("cpu")), bf16=bf16)  # fmt: skip
        assert seen and set(seen) == {expected}
    assert losses == [torch.float32, torch.float32]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_a_bf16_trial_learns_like_an_fp32_one_and_is_not_the_same_run():
    fp32 = run_trial(TrialConfig(**DIGITS, loss="ce")).history
    bf16 = run_trial(TrialConfig(**DIGITS, loss="ce", precision="bf16")).history
    assert fp32[0]["bf16"] == 0.0 and bf16[0]["bf16"] == 1.0
    assert bf16[0]["train_loss"] != fp32[0]["train_loss"]  # autocast really changed the numbers
    assert bf16[-1]["test_acc"] > 0.85
    assert bf16[-1]["test_acc"] == pytest.approx(fp32[-1]["test_acc"], abs=0.05)


@pytest.mark.slow
def test_a_compiled_trial_gives_the_eager_trials_results():
    config = TrialConfig(**{**DIGITS, "epochs": 2}, loss="jal_ce", model="mlp")
    eager = run_trial(config).history
    states = []
    compiled = run_trial(
        config.model_copy(update={"compile": True}), report=lambda m, s: states.append(s)
    ).history
    for e, c in zip(eager, compiled, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["test_acc"] == pytest.approx(e["test_acc"], abs=0.01)
    # Checkpoints hold the model's own keys, loadable into an uncompiled model.
    assert not any(k.startswith("_orig_mod") for k in states[-1]["model"])


def test_auto_precision_is_the_profiles_choice_where_the_cpu_has_bf16_instructions():
    cpu = torch.device("cpu")
    flags = set(open("/proc/cpuinfo").read().split())
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert fast_bf16(cpu) == has_bf16
    assert check_precision("auto", get_profile("mnist"), cpu) == has_bf16  # measured: kept
    assert not check_precision("auto", get_profile("cifar10"), cpu)  # not measured: fp32
    assert not check_precision("fp32", get_profile("mnist"), cpu)
    assert check_precision("bf16", get_profile("cifar10"), cpu)
    history = run_trial(TrialConfig(dataset="mnist", train_subset=512, epochs=1)).history
    assert history[0]["bf16"] == float(has_bf16)  # what ran is on record
