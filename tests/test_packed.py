"""Packed trials: K members in one process against K separate `run_trial` calls.

What is checked is what holds on every machine (see `jal_search.packed`'s docstring): exactly, what
does not depend on float rounding (initial weights, batches, noisy labels, lr schedule, epochs,
statuses); to rounding, a few SGD steps (in float64: see that test); over many noisy steps,
metrics within bands that chaotic divergence stays inside and a real mix-up does not.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from rounding import EPS32, EXACT, assert_same_course, assert_within_rounding
from torch import nn

import jal_search.packed
import jal_search.train
from jal_search.config import TrialConfig
from jal_search.errors import UserError
from jal_search.loaders import TensorLoader
from jal_search.models import build_model, model_names
from jal_search.packed import Pack, PackTrainer, check_packable, run_packed
from jal_search.train import load_checkpoint, run_trial, save_checkpoint

BASE = dict(dataset="digits", epochs=2, noise_type="symmetric", noise_rate=0.4, lr=0.02)

# A few steps: 256 digits, half held out, batches of 64: 2 SGD steps per epoch, 4 in all (so
# momentum, the cosine lr's second value and the epoch boundary are in), on the CPU.
FEW = dict(BASE, train_subset=256, val_fraction=0.5, batch_size=64, device="cpu")
STEPS_PER_EPOCH = 2
# The longest sum of a step: the first conv's weight gradient, over 64 images × 8×8 positions.
LONGEST_SUM = 64 * 8 * 8


@pytest.fixture
def seen(monkeypatch):
    """What trainings are built from and fed, recorded as they run: every model's initial state
    (in build order) and every training (shuffling) loader's batches. `take()` hands them over.
    With `float64 = True`, models and batches are float64 (see the few-steps test)."""
    inits, batches = [], {}
    record = SimpleNamespace(float64=False)

    def spy_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        if record.float64:
            model.double()
        inits.append(copy.deepcopy(model.state_dict()))
        return model

    for module in (jal_search.train, jal_search.packed):
        monkeypatch.setattr(module, "build_model", spy_build)
    original = TensorLoader.batches

    def spy_batches(self, epoch):
        for images, labels in original(self, epoch):
            if record.float64:
                images = images.double()
            if self.shuffle:
                batches.setdefault(self, []).append((images.clone(), labels.clone()))
            yield images, labels

    monkeypatch.setattr(TensorLoader, "batches", spy_batches)

    def take():
        taken = list(inits), list(batches.values())  # loaders in order of first use
        inits.clear()
        batches.clear()
        return taken

    record.take = take
    return record


def _run_alone(config):
    """run_trial's result and the model's state after each epoch (copied: states alias it)."""
    states = []
    result = run_trial(config, report=lambda m, s: states.append(copy.deepcopy(s["model"])))
    return result, states


def _run_packed(configs):
    """run_packed's results and, per member, its model state after each epoch it trained."""
    states = {i: [] for i in range(len(configs))}

    def report(metrics, state):
        for i in metrics:
            states[i].append(copy.deepcopy(state["members"][i]["model"]))

    return run_packed(configs, report=report), states


def _assert_same_start(pack_init, pack_batches, alone_init, alone_batches):
    """Bit for bit the same initial weights and the same batches (images, noisy and clean labels)
    in the same order: none of it depends on float rounding, so no layout may change it."""
    assert pack_init.keys() == alone_init.keys()
    assert all(torch.equal(pack_init[k], alone_init[k]) for k in alone_init)
    assert len(pack_batches) == len(alone_batches) > 0
    for (pi, pl), (ai, al) in zip(pack_batches, alone_batches, strict=True):
        assert torch.equal(pl, al) and torch.equal(pi, ai)


def _members():
    return [
        dict(seed=1, loss="jal_ce"),  # the paper's parameters, L1 on
        dict(seed=2, loss="jal_fl", loss_params={"alpha": 5.0, "beta": 0.5, "a": 10.0}, lr=0.01),
        dict(seed=3, loss="gce", val_labels="clean"),  # L2 instead of L1
    ]


def test_a_few_packed_steps_are_each_members_own_steps_to_float_rounding(seen):
    # In float64 (the loss stays float32, as everywhere). In float32 a value within rounding of a
    # ReLU's zero or a max-pool's tie sometimes (2 of 150 four-step member runs here) sends one
    # gradient term elsewhere, a difference no rounding tolerance covers; in float64 such a value
    # must lie within ~1e-16 of it, about 1e9 times rarer.
    seen.float64 = True
    configs = [TrialConfig(**{**FEW, **m}) for m in _members()]
    packed, packed_states = _run_packed(configs)
    pack_inits, pack_batches = seen.take()
    for i, config in enumerate(configs):
        alone, alone_states = _run_alone(config)
        (alone_init,), (alone_batches,) = seen.take()
        _assert_same_start(pack_inits[i], pack_batches[i], alone_init, alone_batches)
        assert len(alone_batches) == STEPS_PER_EPOCH * config.epochs
        assert packed[i].status == alone.status == "completed"
        assert packed[i].data.label_hash == alone.data.label_hash
        for epoch, (p, a) in enumerate(zip(packed_states[i], alone_states, strict=True), 1):
            assert_within_rounding(p, a, alone_init, epoch * STEPS_PER_EPOCH, LONGEST_SUM)
        for a, p in zip(alone.history, packed[i].history, strict=True):
            # Predictions: logits 1e-11 apart flip no argmax (but one sample in 1e9 or so).
            for key in (*EXACT, "noisy_fit", "memorized", "val_acc", "test_acc"):
                assert p[key] == a[key], (a["epoch"], key)
            # The loss is float32: a few eps32 of it (its longest sum: the batch mean over 64).
            assert p["train_loss"] == pytest.approx(a["train_loss"], rel=4 * EPS32 * 8)
    # The members really differ: the equalities above do not compare a run with itself.
    assert len({round(r.history[-1]["train_loss"], 3) for r in packed}) == 3


def test_packed_members_train_as_they_would_alone(seen):
    configs = [TrialConfig(**{**BASE, **m}) for m in _members()]
    rng = torch.random.get_rng_state()
    packed = run_packed(configs)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeding did not leak out of the pack
    pack_inits, pack_batches = seen.take()
    for i, config in enumerate(configs):
        alone = run_trial(config)
        (alone_init,), (alone_batches,) = seen.take()
        _assert_same_start(pack_inits[i], pack_batches[i], alone_init, alone_batches)
        assert packed[i].status == alone.status == "completed"
        assert packed[i].data.label_hash == alone.data.label_hash  # the member's own noisy labels
        assert_same_course(alone.history, packed[i].history)
    # The members really differ: equality above is not one run compared with itself.
    losses = {round(r.history[-1]["train_loss"], 3) for r in packed}
    assert len(losses) == 3


def test_a_diverging_member_stops_alone_and_leaves_the_others_untouched(seen):
    healthy = TrialConfig(**BASE, seed=5, loss="ce")
    diverging = TrialConfig(**{**BASE, "lr": 1e6}, seed=4, loss="ce")
    packed, states = _run_packed([diverging, healthy])
    assert packed[0].status == "diverged"
    assert packed[0].history[-1]["diverged"] == 1.0
    assert packed[1].status == "completed"
    # Members never exchange values: in the same layout, beside a member that does not diverge,
    # the healthy one trains bit for bit as beside the diverging one's NaN weights.
    calm, calm_states = _run_packed([diverging.model_copy(update={"lr": 0.02}), healthy])
    assert calm[0].status == "completed"
    drop = ("epoch_seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in packed[1].history] == [
        {k: v for k, v in m.items() if k not in drop} for m in calm[1].history
    ]
    for a, b in zip(states[1], calm_states[1], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)
    pack_inits, pack_batches = seen.take()
    alone = run_trial(healthy)
    (alone_init,), (alone_batches,) = seen.take()
    _assert_same_start(pack_inits[1], pack_batches[1], alone_init, alone_batches)
    assert_same_course(alone.history, packed[1].history)


@pytest.mark.parametrize("name", model_names())
def test_the_wide_model_computes_each_member_exactly(name):
    channels, size, batch, k = 3, 32, 4, 2
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(build_model(name, 10, channels, size))
    pack = Pack(members[0], [m.state_dict() for m in members])
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
    # Same machine, same layout, same threads: the same operations on the same values, so the
    # same bits (NaN for NaN), not merely close ones.
    for a, b in zip(whole, resumed, strict=True):
        assert b.status == a.status
        assert [m["epoch"] for m in b.history] == [m["epoch"] for m in a.history]
        for ma, mb in zip(a.history, b.history, strict=True):
            for key in ("train_loss", "noisy_fit", "memorized", "val_acc", "test_acc", "lr"):
                assert mb[key] == pytest.approx(ma[key], rel=0, abs=0, nan_ok=True), key
    for i in (0, 2):
        for name, value in states[-1]["members"][i]["model"].items():
            assert torch.equal(resumed_states[-1]["members"][i]["model"][name], value), name


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
        Pack(model, [model.state_dict()] * 2)


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


def test_an_empty_pack_is_refused():
    with pytest.raises(UserError, match="at least one"):
        run_packed([])


def test_members_may_differ_in_everything_else():
    first = TrialConfig(**BASE, seed=1)
    other = first.model_copy(
        update={"seed": 9, "loss": "gce", "lr": 0.3, "noise_rate": 0.2, "val_labels": "clean"}
    )
    assert [c.seed for c in check_packable([first, other])] == [1, 9]


def test_members_that_join_and_leave_between_epochs_train_as_they_would_alone(seen):
    # A pack worker's slots: A trains an epoch alone, B joins (A at its epoch 2, B at its 1: each
    # its own lr and batches), A leaves, B ends alone. In float64, as the few-steps test above.
    seen.float64 = True
    a, b = (TrialConfig(**{**FEW, **m}) for m in _members()[:2])
    trainer = PackTrainer(a)
    states = {}
    ka = trainer.add(a)
    epochs = [[ka]]
    kb = trainer.add(b)
    epochs += [[ka, kb], [kb]]
    histories = {ka: [], kb: []}
    for i, keys in enumerate(epochs):
        if i == 2:
            trainer.remove(ka)
        metrics = trainer.train_epoch(keys)
        assert sorted(metrics) == sorted(keys)
        for key in keys:
            histories[key].append(metrics[key])
            states.setdefault(key, []).append(copy.deepcopy(trainer.state(key)["model"]))
    assert trainer.train_epoch([kb]) == {}  # B has run its 2 epochs
    assert trainer.result(kb).status == "completed"
    pack_inits, pack_batches = seen.take()
    for i, (key, config) in enumerate(((ka, a), (kb, b))):
        alone, alone_states = _run_alone(config)
        (alone_init,), (alone_batches,) = seen.take()
        _assert_same_start(pack_inits[i], pack_batches[i], alone_init, alone_batches)
        for epoch, (p, q) in enumerate(zip(states[key], alone_states, strict=True), 1):
            assert_within_rounding(p, q, alone_init, epoch * STEPS_PER_EPOCH, LONGEST_SUM)
        for p, q in zip(histories[key], alone.history, strict=True):
            for k in (*EXACT, "noisy_fit", "memorized", "val_acc", "test_acc"):
                assert p[k] == q[k], (q["epoch"], k)


def test_a_member_continues_in_another_pack_exactly_as_in_its_own(tmp_path):
    # Its checkpoint is its own: moved after epoch 1 from a pack with A into a new pack with C
    # (same size, so the same layout), it ends bit for bit as if it had stayed.
    x, a, c = (TrialConfig(**{**BASE, "epochs": 3}, seed=s, loss=loss) for s, loss in
               ((1, "jal_ce"), (2, "ce"), (3, "gce")))  # fmt: skip
    stayed = PackTrainer(x)
    kx, ka = stayed.add(x), stayed.add(a)
    stayed.train_epoch([kx, ka])
    save_checkpoint(stayed.state(kx), tmp_path)  # through the file format trials use
    for _ in range(2):
        stayed.train_epoch([kx, ka])
    moved = PackTrainer(c)
    kc, kx2 = moved.add(c), moved.add(x, resume=load_checkpoint(tmp_path))
    for _ in range(2):
        moved.train_epoch([kx2, kc])  # x in the first slot before, the second now
    whole, continued = stayed.state(kx), moved.state(kx2)
    assert continued["epoch"] == whole["epoch"] == 3
    assert continued["status"] == whole["status"] == "completed"
    drop = ("epoch_seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in continued["history"]] == [
        {k: v for k, v in h.items() if k not in drop} for h in whole["history"]
    ]
    for name, value in whole["model"].items():
        assert torch.equal(continued["model"][name], value), name
    for name, value in whole["momentum"].items():
        assert torch.equal(continued["momentum"][name], value), name


def test_a_checkpoint_of_another_member_is_refused():
    x = TrialConfig(**{**BASE, "epochs": 1}, seed=1, loss="ce")
    trainer = PackTrainer(x)
    key = trainer.add(x)
    trainer.train_epoch([key])
    state = trainer.state(key)
    with pytest.raises(UserError, match="resume: the checkpoint is of another pack member"):
        trainer.add(x.model_copy(update={"noise_rate": 0.2}), resume=state)


def test_a_checkpoint_of_a_smaller_pack_is_refused():
    configs = [TrialConfig(**{**BASE, "epochs": 1}, seed=s, loss="ce") for s in (1, 2, 3)]
    states = []
    run_packed(configs[:2], report=lambda m, s: states.append(s))
    with pytest.raises(UserError, match="another number of members"):
        run_packed(configs, resume=states[0])
