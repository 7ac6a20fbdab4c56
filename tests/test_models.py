"""Tests for jal_search.models: shapes, architectures, the SPEC §3.1 init rule, errors, training."""

import copy
import math
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torchvision.models import resnet50

from jal_search.errors import UserError
from jal_search.models import (
    BasicBlock,
    build_model,
    global_rng_seeded,
    load_pretrained_resnet50,
    model_names,
)

OWN_MODELS = [("cnn_cifar", 3, 32), ("cnn_small", 1, 28), ("mlp", 1, 8)]


def _build(name: str, num_classes: int, in_channels: int, size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes, in_channels, size)


def _resnet50_1000() -> nn.Module:
    """An ImageNet-shaped torchvision ResNet-50 with non-default running stats."""
    model = resnet50(weights=None)
    with torch.no_grad():
        model.layer4[2].bn3.running_var.uniform_(0.5, 2.0)
    return model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names_match_registry():
    assert model_names() == ["cnn_cifar", "resnet34_cifar", "resnet50", "cnn_small", "mlp"]


@pytest.mark.parametrize(
    ("name", "channels", "size", "batch"),
    [
        ("cnn_cifar", 3, 32, 4),
        ("resnet34_cifar", 3, 32, 2),
        ("resnet50", 3, 64, 2),
        ("cnn_small", 1, 28, 4),
        ("cnn_small", 1, 8, 4),  # sklearn digits
        ("cnn_small", 3, 12, 4),
        ("mlp", 1, 8, 4),
    ],
)
def test_output_shape_in_train_and_eval(name, channels, size, batch):
    model = _build(name, 7, channels, size)
    x = torch.randn(batch, channels, size, size)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (batch, 7)
        assert torch.isfinite(out).all()


def test_cnn_cifar_parameter_count_matches_spec_architecture():
    # SPEC §3.1: 3x3 convs (with bias, as upstream) + BN, FC 3136->256 + BN1d, FC 256->K.
    k = 10
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 196), (196, 196)]
    expected = sum(9 * cin * cout + cout + 2 * cout for cin, cout in convs)
    expected += 196 * 4 * 4 * 256 + 256 + 2 * 256 + 256 * k + k
    assert _n_params(_build("cnn_cifar", k, 3, 32)) == expected


def test_resnet34_cifar_parameter_count_matches_architecture():
    # BasicBlock [3,4,6,3] at widths 64..512, bias-free convs, 1x1 conv+BN shortcut on change.
    k = 100
    expected = 9 * 3 * 64 + 2 * 64
    in_planes = 64
    for i, (planes, n) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3], strict=True)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            expected += 9 * in_planes * planes + 9 * planes * planes + 4 * planes
            if stride != 1 or in_planes != planes:
                expected += in_planes * planes + 2 * planes
            in_planes = planes
    expected += 512 * k + k
    assert _n_params(_build("resnet34_cifar", k, 3, 32)) == expected


@pytest.mark.parametrize(("in_planes", "stride"), [(8, 1), (4, 2)])
def test_basic_block_adds_its_shortcut(in_planes, stride):
    # With the residual branch's last BN zeroed, the block reduces to relu(shortcut(x)).
    torch.manual_seed(0)
    block = BasicBlock(in_planes, 8, stride).eval()
    nn.init.zeros_(block.bn2.weight)
    nn.init.zeros_(block.bn2.bias)
    x = torch.randn(2, in_planes, 6, 6)
    expected = x if in_planes == 8 and stride == 1 else block.shortcut(x)
    assert expected.shape == (2, 8, 6 // stride, 6 // stride)
    torch.testing.assert_close(block(x), F.relu(expected))


@pytest.mark.parametrize(("name", "channels", "size"), OWN_MODELS)
def test_init_follows_spec_rule(name, channels, size):
    # Conv: Kaiming-uniform(fan_in, relu) = U(±sqrt(6/fan_in)); linear: Xavier = U(±sqrt(6/(i+o))).
    # PyTorch's default bound is 1/sqrt(fan_in), 2.4x smaller: the std check tells them apart.
    model = _build(name, 10, channels, size)
    checked = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(6 / fan_in)
        elif isinstance(m, nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
        else:
            continue
        w = m.weight.detach()
        assert w.abs().max() <= bound
        if w.numel() >= 500:  # std of U(±b) is b/sqrt(3); loose enough for small samples
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        checked += 1
    assert checked >= 2


def test_resnet50_keeps_torchvision_init_with_zero_init_residual():
    model = _build("resnet50", 5, 3, 32)
    assert model.fc.out_features == 5
    assert torch.all(model.layer1[0].bn3.weight == 0)
    assert torch.all(model.layer4[2].bn3.weight == 0)


@pytest.mark.parametrize(("name", "channels", "size"), OWN_MODELS)
def test_same_seed_same_weights_other_seed_differs(name, channels, size):
    a = _build(name, 10, channels, size, seed=3).state_dict()
    b = _build(name, 10, channels, size, seed=3).state_dict()
    c = _build(name, 10, channels, size, seed=4).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a if a[key].is_floating_point())


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "vgg16"}, "cnn_cifar, resnet34_cifar, resnet50, cnn_small, mlp"),
        ({"name": "cnn_cifar", "image_size": 28}, "32"),
        ({"name": "cnn_small", "image_size": 30}, "divisible by 4"),
        ({"name": "resnet34_cifar", "image_size": 4}, ">= 8"),
        ({"name": "resnet50", "in_channels": 1}, "in_channels 3"),
        ({"name": "resnet50", "image_size": 16}, ">= 32"),
        ({"name": "mlp", "num_classes": 1}, "num_classes"),
        ({"name": "mlp", "in_channels": 0}, "in_channels"),
        ({"name": "mlp", "image_size": 8.0}, "image_size"),
    ],
)
def test_bad_arguments_raise_one_line_user_error(kwargs, fragment):
    args = {"num_classes": 10, "in_channels": 3, "image_size": 32} | kwargs
    with pytest.raises(UserError) as info:
        build_model(**args)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_cnn_small_learns_a_separable_problem():
    # Each class is a fixed random 8x8 pattern plus noise; a few SGD steps must cut the loss.
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 1, 8, 8, generator=gen)
    y = torch.arange(64) % 4
    x = prototypes[y] + 0.5 * torch.randn(64, 1, 8, 8, generator=gen)
    model = _build("cnn_small", 4, 1, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(("name", "channels", "size"), OWN_MODELS)
def test_vmap_over_stacked_models_matches_separate_calls(name, channels, size):
    # Train-mode BN included: outputs and running-stat updates equal those of each model alone.
    models = [_build(name, 10, channels, size, seed=s) for s in (0, 1)]
    x = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(0))
    copies = [copy.deepcopy(m) for m in models]
    expected = [m(x) for m in copies]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for i, m in enumerate(copies):
        torch.testing.assert_close(out[i], expected[i], rtol=1e-4, atol=1e-5)
        for key, buf in m.named_buffers():
            torch.testing.assert_close(buffers[key][i], buf)


def test_load_pretrained_resnet50_replaces_fc_and_keeps_weights(tmp_path):
    torch.manual_seed(0)
    source = _resnet50_1000()
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = load_pretrained_resnet50(path, num_classes=14)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[2].bn3.running_var, source.layer4[2].bn3.running_var)
    assert (model.fc.in_features, model.fc.out_features) == (2048, 14)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 14)


def test_load_pretrained_resnet50_bad_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_resnet50(tmp_path / "missing.pth", num_classes=14)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_pretrained_resnet50(garbage, num_classes=14)
    wrong = tmp_path / "wrong.pth"
    torch.save(_build("mlp", 10, 1, 8).state_dict(), wrong)
    with pytest.raises(UserError, match="not a 1000-class"):
        load_pretrained_resnet50(wrong, num_classes=14)


def test_models_built_at_once_in_threads_get_the_weights_their_seeds_give():
    """Trials of `executor: local` build their models in threads of one process, which share
    torch's global generator: each must get the weights its seed gives alone."""

    def weights(seed: int) -> torch.Tensor:
        with global_rng_seeded(seed):
            model = build_model("cnn_small", 10, 1, 28)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    alone = {seed: weights(seed) for seed in range(4)}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns within a model's initialisation
    try:
        built: dict[tuple[int, int], torch.Tensor] = {}

        def build(seed: int) -> None:
            for round_ in range(5):
                built[seed, round_] = weights(seed)

        threads = [threading.Thread(target=build, args=(seed,)) for seed in alone]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(built) == 20
    assert all(torch.equal(w, alone[seed]) for (seed, _), w in built.items())
