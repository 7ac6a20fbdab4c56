"""Model registry: the paper's networks (SPEC §3) plus two small models for fast runs.

Every builder takes ``(num_classes, in_channels, image_size)`` for square inputs of shape
``(N, in_channels, image_size, image_size)`` and returns logits of shape ``(N, num_classes)``.

Conventions:
- Our own models (everything except ``resnet50``) are initialised by :func:`init_weights`, the
  rule of SPEC §3.1 and of the upstream ``_reset_prams``: Kaiming-uniform (fan_in, relu) for conv
  weights, Xavier-uniform for linear weights; biases and BatchNorm keep PyTorch's defaults.
- Initialisation draws from torch's global generator: built inside :func:`global_rng_seeded`
  (as trials build theirs), a model's weights depend on the seed alone.
- No module updates activations in place (no ``inplace=True`` ReLU, no ``+=`` on activations), so
  the models run under ``torch.func.functional_call`` + ``vmap`` with stacked parameters and
  buffers (``torch.func.stack_module_state``), BatchNorm in train mode included.
- Nothing is downloaded: ``resnet50`` is randomly initialised; ImageNet weights come only from a
  local file through :func:`load_pretrained_resnet50`.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from pickle import UnpicklingError

import torch
import torch.nn.functional as F
from torch import nn

from jal_search.errors import UserError

__all__ = [
    "build_model",
    "global_rng_seeded",
    "init_weights",
    "load_pretrained_resnet50",
    "model_names",
]

_GLOBAL_RNG = threading.Lock()


@contextmanager
def global_rng_seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with `seed` inside the block, restored after it. Held
    under a lock: trials in threads of one process (`executor: local`) share that generator, and
    two trials drawing from it at once would each get weights other than their seed gives."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_weights(model: nn.Module) -> nn.Module:
    """Apply SPEC §3.1's rule to every Conv2d and Linear in ``model``, in place; return it.

    Conv weights: Kaiming-uniform, fan_in, relu gain, i.e. U(-b, b) with b = sqrt(6 / fan_in).
    Linear weights: Xavier-uniform, U(-b, b) with b = sqrt(6 / (fan_in + fan_out)).
    Biases and BatchNorm parameters are left at PyTorch's defaults, as upstream does.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return model


def _conv_bn_relu(in_ch: int, out_ch: int, bias: bool) -> nn.Sequential:
    """3×3 conv (padding 1, size-preserving) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=bias),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class CifarCNN(nn.Module):
    """The 8-layer CNN of SPEC §3.1 (upstream ``CNN(type='cifar10')``), for 32×32 inputs.

    [64,64]→maxpool, [128,128]→maxpool, [196,196]→maxpool, then 196·4·4 → 256 (+BN1d, ReLU) → K.
    Convs keep their bias before BN, as upstream, so parameter counts match the paper's model.
    """

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        widths = [(in_channels, 64), (64, 128), (128, 196)]
        self.features = nn.Sequential(
            *(
                nn.Sequential(
                    _conv_bn_relu(cin, cout, bias=True),
                    _conv_bn_relu(cout, cout, bias=True),
                    nn.MaxPool2d(2),
                )
                for cin, cout in widths
            )
        )
        self.fc1 = nn.Sequential(nn.Linear(196 * 4 * 4, 256), nn.BatchNorm1d(256), nn.ReLU())
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.features(x).flatten(1)))


class SmallCNN(nn.Module):
    """A fast CNN for MNIST-like data: two conv(3×3)→maxpool→BN→ReLU stages, then an MLP head.

    Widths 16 and 32, head 32·(s/4)² → 128 → K for an s×s input (s divisible by 4). Convs have no
    bias because BatchNorm's shift makes it redundant.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        # Pooling before BN+ReLU (as airbench does) runs them on 4x fewer values; max-pool
        # commutes with ReLU, and BN then normalises the pooled features.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Linear(32 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs); the shortcut is a 1×1 conv + BN when the shape changes.

    Attribute names follow the upstream code so its CIFAR ResNet checkpoints load as they are.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (SPEC §3.1): 3×3 stem at stride 1, no max-pool, four stages of
    BasicBlocks at widths 64/128/256/512 (strides 1/2/2/2), global average pool, linear 512 → K.

    The global average pool equals upstream's 4×4 ``avg_pool2d`` at 32×32 input, where the last
    feature map is 4×4; unlike it, it also gives the right shape for other input sizes.
    """

    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers = []
        in_planes = 64
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], num_blocks, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean(dim=(2, 3)))


def _cnn_cifar(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size != 32:
        raise UserError(
            f"model cnn_cifar needs image_size 32 (its head expects 196·4·4 features), got "
            f"{image_size}: resize the images to 32×32 or choose model cnn_small"
        )
    # Channels-last, as cnn_small: oneDNN's channels-last convolutions made a CPU training step
    # 15-20% faster (loop_vs_reference.py's workload, 1 and 2 threads); same initial values.
    model = init_weights(CifarCNN(num_classes, in_channels))
    return model.to(memory_format=torch.channels_last)


def _resnet34_cifar(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size < 8:
        raise UserError(
            f"model resnet34_cifar needs image_size >= 8 (it downsamples 8×), got {image_size}: "
            "choose model cnn_small or mlp for tiny images"
        )
    return init_weights(CifarResNet([3, 4, 6, 3], num_classes, in_channels))


def _resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if in_channels != 3:
        raise UserError(
            f"model resnet50 needs in_channels 3 (torchvision's RGB stem), got {in_channels}: "
            "use RGB images or choose model resnet34_cifar"
        )
    if image_size < 32:
        raise UserError(
            f"model resnet50 needs image_size >= 32 (it downsamples 32×), got {image_size}: "
            "resize the images (224 in the paper) or choose model cnn_small"
        )
    # torchvision's own init (Kaiming-normal fan_out, zero-init last BN per block), as upstream.
    # Imported here: torchvision.models pulls in torch._dynamo, ~1.5 s of every trial process's
    # start-up, for the one model that needs it.
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)


def _cnn_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size % 4 != 0:
        raise UserError(
            f"model cnn_small needs image_size divisible by 4 (two 2×2 max-pools), got "
            f"{image_size}: pad or resize the images (e.g. to {4 * (image_size // 4 + 1)})"
        )
    # Channels-last conv weights make oneDNN run the whole conv stack channels-last on CPU;
    # together with pooling first, this doubled training throughput on 2 cores.
    model = init_weights(SmallCNN(num_classes, in_channels, image_size))
    return model.to(memory_format=torch.channels_last)


def _mlp(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return init_weights(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    )


_REGISTRY: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn_cifar": _cnn_cifar,
    "resnet34_cifar": _resnet34_cifar,
    "resnet50": _resnet50,
    "cnn_small": _cnn_small,
    "mlp": _mlp,
}


def model_names() -> list[str]:
    """The names :func:`build_model` accepts, in registry order."""
    return list(_REGISTRY)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build model ``name`` for ``image_size``×``image_size`` inputs with ``in_channels`` channels.

    Returns a freshly initialised module (in train mode, on the CPU) producing
    ``(N, num_classes)`` logits. Raises UserError for an unknown name, non-positive sizes,
    fewer than 2 classes, or an input shape the architecture cannot take.
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(_REGISTRY)}")
    for field, value, low in (
        ("num_classes", num_classes, 2),
        ("in_channels", in_channels, 1),
        ("image_size", image_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"model {name}: {field} must be an integer >= {low}, got {value!r}")
    return _REGISTRY[name](num_classes, in_channels, image_size)


def load_pretrained_resnet50(path: str | Path, num_classes: int) -> nn.Module:
    """torchvision ResNet-50 with ImageNet weights from a local file, ``fc`` replaced for K classes.

    This is the Clothing1M setup of SPEC §3.2 (``ResNet50_Weights.DEFAULT``, then
    ``fc = Linear(2048, K)`` with PyTorch's default init). ``path`` is a state dict saved with
    ``torch.save`` for the standard 1000-class torchvision ResNet-50 (for example the file
    torchvision caches as ``~/.cache/torch/hub/checkpoints/resnet50-*.pth``); it is read with
    ``weights_only=True``. A missing, unreadable or mismatching file raises UserError.
    """
    path = Path(path)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(
            f"load_pretrained_resnet50: num_classes must be an integer >= 2, got {num_classes!r}"
        )
    if not path.is_file():
        raise UserError(
            f"pretrained weights file {path} does not exist: give the path of a "
            "torchvision ResNet-50 state dict (.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, UnpicklingError) as exc:
        raise UserError(
            f"pretrained weights file {path} cannot be read ({type(exc).__name__}): "
            "re-download or re-save it with torch.save(model.state_dict(), path)"
        ) from exc
    model = _resnet50(1000, 3, 224)  # torchvision's own ImageNet architecture
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(
            f"pretrained weights file {path} is not a 1000-class torchvision "
            "ResNet-50 state dict: save one with torch.save(model.state_dict(), path)"
        ) from exc
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
