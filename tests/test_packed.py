"""Packed trials: K members in one process give what K separate `run_trial` calls give."""

import copy

import pytest
import torch
from torch import nn

from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.models import build_model, model_names
from jal_search.packed import Pack, check_packable, member_model, run_packed
from jal_search.train import load_checkpoint, run_trial, save_checkpoint

# A modest lr keeps two epochs of digits tame: float differences between grouped and plain kernels
# (1e-7) then stay small instead of flipping a max-pool's winner and growing from there.
BASE = dict(dataset="digits", epochs=2, noise_type="symmetric", noise_rate=0.4, lr=0.02)


def _run_alone(config):
    """run_trial's history and the final model's state (copied: the state aliases the model)."""
    states = []
    result = run_trial(config, report=lambda m, s: states.append(copy.deepcopy(s["model"])))
    return result, states[-1]


def _run_packed(configs):
    """run_packed's results and each member's model state after the last epoch it trained."""
    states = {}

    def report(metrics, state):
        for i in metrics:
            states[i] = copy.deepcopy(member_model(state, i))

    return run_packed(configs, report=report), states


def _assert_same_history(alone, packed, num_val, num_test):
    assert [m["epoch"] for m in packed] == [m["epoch"] for m in alone]
    for a, p in zip(alone, packed, strict=True):
        assert set(p) == set(a)
        for key in ("train_loss", "noisy_fit", "memorized", "lr", "noise_realised", "diverged"):
            assert p[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7, nan_ok=True), key
        # Grouped kernels round differently from plain ones: allow one sample's flip.
        assert p["val_acc"] == pytest.approx(a["val_acc"], abs=1.01 / num_val, nan_ok=True)
        assert p["test_acc"] == pytest.approx(a["test_acc"], abs=1.01 / num_test, nan_ok=True)


def test_packed_members_train_as_they_would_alone():
    configs = [
        TrialConfig(**BASE, seed=1, loss="jal_ce"),  # the paper's parameters, L1 on
        TrialConfig(
            **{**BASE, "lr": 0.01},  # its own lr too
            seed=2,
            loss="jal_fl",
            loss_params={"alpha": 5.0, "beta": 0.5, "a": 10.0},
        ),
        TrialConfig(**BASE, seed=3, loss="gce", val_labels="clean"),  # L2 instead of L1
    ]
    rng = torch.random.get_rng_state()
    packed, packed_states = _run_packed(configs)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeding did not leak out of the pack
    for i, config in enumerate(configs):
        alone, alone_state = _run_alone(config)
        data = alone.data
        assert packed[i].status == alone.status == "completed"
        assert packed[i].data.label_hash == data.label_hash  # the member's own noisy labels
        _assert_same_history(
            alone.history, packed[i].history, len(data.val_idx), len(data.dataset.test_labels)
        )
        assert packed_states[i].keys() == alone_state.keys()
        for name, value in alone_state.items():
            torch.testing.assert_close(packed_states[i][name], value, atol=1e-3, rtol=1e-3)
    # The members really differ: equality above is not one run compared with itself.
    losses = {round(r.history[-1]["train_loss"], 3) for r in packed}
    assert len(losses) == 3


def test_a_diverging_member_stops_alone_and_leaves_the_others_untouched():
    healthy = TrialConfig(**BASE, seed=5, loss="ce")
    configs = [TrialConfig(**{**BASE, "lr": 1e6}, seed=4, loss="ce"), healthy]
    packed, _ = _run_packed(configs)
    assert packed[0].status == "diverged"
    assert packed[0].history[-1]["diverged"] == 1.0
    assert packed[1].status == "completed"
    alone, _ = _run_alone(healthy)
    data = alone.data
    _assert_same_history(
        alone.history, packed[1].history, len(data.val_idx), len(data.dataset.test_labels)
    )


@pytest.mark.parametrize("name", model_names())
def test_the_wide_model_computes_each_member_exactly(name):
    channels, size, batch, k = 3, 32, 4, 2
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(build_model(name, 10, channels, size))
    pack = Pack(members)
    x = torch.randn(k, batch, channels, size, size)
    logits = pack(pack.join(list(x)))  # train mode: BatchNorm uses batch statistics
    for i, member in enumerate(members):
        torch.testing.assert_close(logits[i], member(x[i]), atol=1e-4, rtol=1e-4)
        state = pack.member_state(i)
        for key, value in member.state_dict().items():  # running statistics included
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4)
    pack.eval()
    shared = x[0]
    with torch.no_grad():
        logits = pack(pack.repeat(shared))
        for i, member in enumerate(members):
            torch.testing.assert_close(logits[i], member.eval()(shared), atol=1e-4, rtol=1e-4)


def test_a_pack_resumed_from_its_checkpoint_ends_as_if_never_stopped(tmp_path):
    configs = [
        TrialConfig(**{**BASE, "epochs": 3}, seed=1, loss="jal_ce"),
        TrialConfig(**{**BASE, "epochs": 3, "lr": 1e6}, seed=2, loss="ce"),  # diverges at once
        TrialConfig(**{**BASE, "epochs": 3}, seed=3, loss="gce"),
    ]
    states = []
    whole = run_packed(configs, report=lambda m, s: states.append(copy.deepcopy(s)))
    assert [r.status for r in whole] == ["completed", "diverged", "completed"]
    save_checkpoint(states[0], tmp_path)  # after epoch 1, through the file format trials use
    resumed_states = []
    resumed = run_packed(
        configs,
        report=lambda m, s: resumed_states.append(copy.deepcopy(s)),
        resume=load_checkpoint(tmp_path),
    )
    assert len(resumed_states) == 2  # epochs 2 and 3 only
    for a, b in zip(whole, resumed, strict=True):
        assert b.status == a.status
        assert [m["epoch"] for m in b.history] == [m["epoch"] for m in a.history]
        for ma, mb in zip(a.history, b.history, strict=True):
            for key in ("train_loss", "val_acc", "test_acc", "noisy_fit"):
                assert mb[key] == pytest.approx(ma[key], nan_ok=True), key
    for i in (0, 2):
        for name, value in member_model(states[-1], i).items():
            torch.testing.assert_close(member_model(resumed_states[-1], i)[name], value)


def test_a_checkpoint_of_another_pack_is_refused():
    configs = [TrialConfig(**{**BASE, "epochs": 1}, seed=s, loss="ce") for s in (1, 2)]
    states = []
    run_packed(configs, report=lambda m, s: states.append(s))
    other = [c.model_copy(update={"noise_rate": 0.2}) for c in configs]
    with pytest.raises(UserError, match="resume: the checkpoint is of another pack"):
        run_packed(other, resume=states[0])


def test_a_layer_packing_does_not_know_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3))
    with pytest.raises(TypeError, match="LayerNorm"):
        Pack([model, copy.deepcopy(model)])


@pytest.mark.parametrize(
    "change, field",
    [
        ({"epochs": 3}, "epochs"),
        ({"batch_size": 32}, "batch_size"),
        ({"dataset": "mnist"}, "dataset"),
        ({"model": "mlp"}, "model"),
        ({"train_subset": 500}, "train_subset"),
        ({"precision": "bf16"}, "precision"),
    ],
)
def test_configs_that_cannot_share_a_pack_are_refused(change, field):
    first = TrialConfig(**BASE, seed=1)
    with pytest.raises(UserError, match=rf"configs\[1\]\.{field}:"):
        check_packable([first, first.model_copy(update={"seed": 2, **change})])


def test_a_compiled_pack_is_refused():
    config = TrialConfig(**BASE, seed=1, compile=True)
    with pytest.raises(UserError, match="compile: packed trials run uncompiled"):
        check_packable([config, config.model_copy(update={"seed": 2})])


def test_an_empty_pack_is_refused():
    with pytest.raises(UserError, match="at least one"):
        run_packed([])


def test_members_may_differ_in_everything_else():
    first = TrialConfig(**BASE, seed=1)
    other = first.model_copy(
        update={"seed": 9, "loss": "gce", "lr": 0.3, "noise_rate": 0.2, "val_labels": "clean"}
    )
    assert [c.seed for c in check_packable([first, other])] == [1, 9]
