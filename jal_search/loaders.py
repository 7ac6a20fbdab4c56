"""The train/validation split, and loaders with batched on-device augmentation.

- In-memory datasets (`data.ImageSet`) are served by `TensorLoader`: the uint8 images live on the
  training device, and normalisation, random crops, flips and rotations run batched there (no
  per-image Python, no worker processes).
- File datasets (`data.FileImageSet`) go through a torch DataLoader with workers, pinned memory
  and the per-image torchvision transforms of SPEC §3.2.
- A loader's shuffling and augmentation derive only from (seed, epoch): `batches(e)` yields the same
  batches whenever it is called, which is what makes resuming at epoch e exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from jal_search.data import AnyImageSet, Augment, FileImageSet, ImageSet
from jal_search.errors import UserError
from jal_search.models import global_rng_seeded

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
        order = to_device(order, self.device)  # once an epoch, not once a batch
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the CPU) on `device`. To CUDA from pinned memory, asynchronously: a copy from
    pageable memory first waits for the GPU's queued work, which would stall every batch."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
    rows = to_device(top + torch.arange(h), images.device)
    cols = to_device(left + cols, images.device)
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
    matrix = to_device(matrix.to(images.dtype), images.device)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
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
        # torchvision's transforms draw from torch's global RNG: seeded per sample, the result
        # depends on (seed, epoch, row) only — not on the worker, the order of work or other trials.
        with global_rng_seeded(sample_seed):
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
