"""One trial, top to bottom: seed, build data/noise/model/loss, train, evaluate every epoch, report.

This is the loop a researcher reads to trust the results. It knows nothing of Ray or MLflow: the
caller passes a `report(metrics, state)` hook that is called once per epoch with the epoch's
metrics and a checkpoint state (plain tensors and numbers, loadable with `weights_only=True`).

Metrics per epoch: `metrics.METRICS` (names, meanings, and where each is used), built by
`metrics.epoch_metrics` here and in `packed.py` alike.

Determinism — what equals what, and how exactly:
- Bit for bit in any computation (alone or packed, any thread count, graphed or not): the noisy
  labels (hence `label_hash`, `noise_realised`) and the split, the initial weights (from `seed`),
  each epoch's batches (order and augmentation from (seed, epoch)), the lr schedule and the epochs
  run. On any machine too, but for what goes through float arithmetic: generated
  instance-dependent noise (a float32 matmul and softmax pick each wrong class: a sample on a
  boundary may go the other way on another CPU), CIFAR-100's rotations (nearest-pixel sampling
  at float coordinates), and the initial weights on an x86 CPU without AVX2 (torch's scalar
  kernels round half of them 1 ulp otherwise; its AVX2 and AVX-512 ones agree).
- Bit for bit given one computation: the same machine (CPU model or GPU, torch build), thread
  count, layout (alone, or the same pack) and precision. A rerun, and a run resumed from its state
  after epoch e, then give the uninterrupted run's metrics and weights exactly (up to
  non-deterministic kernels, e.g. some CUDA ones). On CUDA each step is one replayed CUDA graph
  (`TrialStep`, `graphs.py`): the same kernels as the same step run eagerly, which the first steps
  of a run (and of a resumed one), each epoch's last partial batch, and every step after a failed
  capture (one warning) are; so fresh or resumed, one machine gives one result (on CUDA: checked
  by tests/test_graphs.py).
- Per step only, to float rounding: the same step computed otherwise — another CPU model or
  thread count (another reduction order), packed (`packed.py`), the L1 gradient added after
  backward instead of an L1 term in the loss, the graph-ready step that CUDA runs against the eager
  one (`TensorLrSGD` rounds θ − lr·d in two operations where torch's SGD may fuse them). A step's
  weights agree to a few eps·√n of the update (n: the step's longest sum), except that now and
  then a value within rounding of a ReLU's zero or a max-pool's tie sends one gradient term
  elsewhere (about 1 fp32 step in 300 of the digits CNN, packed against alone).
- Over many noisy steps, in distribution only: those differences grow, the faster the noisier the
  labels and the larger the lr, so two computations of one config end at different weights and
  metrics (5 of 360 test images apart after 4 digits epochs packed against alone on an Intel
  Xeon; 94.9% against 93.0% on MNIST on a GPU after 2 epochs). Compare such runs over seeds or
  within a band, never value for value. bf16 against fp32 differs per step beyond rounding:
  only the distribution compares.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jal_search.config import SUBSET_SEED, VALIDATION_SEED, TrialConfig
from jal_search.data import load_dataset
from jal_search.errors import UserError
from jal_search.graphs import GraphedStep
from jal_search.loaders import eval_loader, split_validation, train_loader
from jal_search.losses import build_loss
from jal_search.metrics import epoch_metrics, evaluates_test_set
from jal_search.models import build_model, global_rng_seeded
from jal_search.noise import corrupt_labels, label_hash, realised_rate, validation_transition
from jal_search.profiles import Profile, get_profile

Metrics = dict[str, float]
Report = Callable[[Metrics, dict[str, Any]], None]


@dataclass(frozen=True)
class TrialData:
    """What a trial trains on: the dataset, the (noisy) labels and the train/validation split."""

    dataset: Any  # data.ImageSet | data.FileImageSet
    clean_labels: torch.Tensor  # the (subset's) training labels, as shipped
    noisy_labels: torch.Tensor
    image_index: np.ndarray  # the dataset rows used for training (a subset, or all)
    train_idx: np.ndarray  # positions into image_index
    val_idx: np.ndarray
    noise_rate: float  # realised fraction of wrong labels
    label_hash: str  # hash of the noisy label vector


@dataclass
class TrialResult:
    status: str  # "completed" | "diverged"
    history: list[Metrics] = field(default_factory=list)
    data: TrialData | None = None


def prepare_data(cfg: TrialConfig) -> TrialData:
    """Load the dataset and build the noisy labels and the split; memoised for reused processes.

    Noise is applied to the whole training (sub)set, then a validation part is held out; its labels
    are the noisy ones unless `val_labels="clean"`. Test labels are always clean.
    """
    return _prepare(
        cfg.dataset,
        cfg.data_root,
        cfg.train_subset,
        cfg.noise_type,
        cfg.noise_rate,
        cfg.noise_file,
        cfg.labels_seed,
        cfg.val_fraction,
    )


@functools.lru_cache(maxsize=4)
def _prepare(
    dataset: str,
    data_root: str | None,
    train_subset: int | None,
    noise_type: str,
    noise_rate: float | str,
    noise_file: str | None,
    noise_seed: int,
    val_fraction: float,
) -> TrialData:
    ds = load_dataset(dataset, data_root)
    labels = ds.train_labels.numpy()
    index = np.arange(len(labels))
    if train_subset is not None and train_subset < len(labels):
        shuffled = np.random.default_rng(SUBSET_SEED).permutation(len(labels))
        index = np.sort(shuffled[:train_subset])
    clean = labels[index]
    features = None
    if noise_type == "dependent" and noise_file is None:
        features = _normalised_features(ds, index)
    noisy = corrupt_labels(
        clean,
        noise_type,
        noise_rate,
        ds.num_classes,
        seed=noise_seed,
        dataset=dataset,
        features=features,
        label_file=noise_file,
    )
    train_idx, val_idx = split_validation(len(index), val_fraction, VALIDATION_SEED)
    return TrialData(
        dataset=ds,
        clean_labels=torch.from_numpy(clean.astype(np.int64)),
        noisy_labels=torch.from_numpy(noisy.astype(np.int64)),
        image_index=index,
        train_idx=train_idx,
        val_idx=val_idx,
        noise_rate=realised_rate(clean, noisy),
        label_hash=label_hash(noisy),
    )


def check_trial(config: TrialConfig) -> None:
    """Build what a trial would build (data, noisy labels, model, loss) without training:
    a config that passes cannot fail at start-up for a reason the user could have fixed."""
    cfg = config.resolve()
    data = prepare_data(cfg)
    channels, size = _image_shape(data.dataset)
    build_model(cfg.model, data.dataset.num_classes, channels, size)
    build_loss(cfg.loss, data.dataset.num_classes, **cfg.loss_params)


def _normalised_features(ds: Any, index: np.ndarray) -> np.ndarray:
    """Flattened, normalised training images: the input of the instance-dependent noise model."""
    if not hasattr(ds, "train_images"):
        raise UserError(
            f"noise_file: {ds.name} is read from files; generated instance-dependent noise "
            "needs an in-memory dataset, so pass a precomputed label file as noise_file"
        )
    images = ds.train_images[torch.from_numpy(index)].float() / 255.0
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return ((images - mean) / std).flatten(1).numpy()


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


# glibc malloc would hand every activation buffer above 128 KiB back to the OS when freed and
# page-fault it in again at the next step; these thresholds keep them (measured on the embedded
# default: an epoch 8% faster one trial per process; packs of 8 1.24× → 1.47× the trials per
# CPU-hour). Ray's trial processes get them in their environment at spawn
# (`tune_adapter.MALLOC_ENV`); a search in the driver's process sets them with `keep_freed_memory`.
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, 4 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Give this running process the malloc thresholds above (glibc's `mallopt`, what its
    MALLOC_*_THRESHOLD_ variables set at start-up); False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    trim = min(MALLOC_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes a C int
    return mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1 == mallopt(M_TRIM_THRESHOLD, trim)


def run_trial(
    config: TrialConfig, report: Report | None = None, resume: dict[str, Any] | None = None
) -> TrialResult:
    """Train one configuration; call `report(metrics, state)` after every epoch.

    The state's tensors alias the live model and optimiser (no copy per epoch): `report` must
    save or copy it before returning. `resume` is such a state (e.g. read by `load_checkpoint`):
    training continues after its epoch. A NaN/inf epoch loss ends the trial with status "diverged".
    """
    cfg = config.resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = prepare_data(cfg)
    ds = data.dataset

    channels, size = _image_shape(ds)
    with global_rng_seeded(cfg.seed):
        net = build_model(cfg.model, ds.num_classes, channels, size).to(device)
    loss_fn = build_loss(cfg.loss, ds.num_classes, **cfg.loss_params)
    profile = get_profile(cfg.dataset)
    bf16 = check_precision(cfg.precision, profile, device, cfg.model)
    optimizer = make_optimizer(net, profile, cfg)
    scheduler = make_scheduler(optimizer, profile, cfg.epochs)

    history: list[Metrics] = []
    start = 0
    if resume is not None:
        if resume["label_hash"] != data.label_hash:
            raise UserError(
                "resume: the checkpoint was trained on different noisy labels "
                f"({resume['label_hash']} != {data.label_hash}); start the trial afresh"
            )
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        history = list(resume["history"])
        start = int(resume["epoch"])

    # Both label vectors travel with each batch, so memorisation is measured without extra passes.
    pair = torch.stack([data.noisy_labels, data.clean_labels], dim=1)
    rows = data.image_index
    train_batches = train_loader(
        ds,
        rows[data.train_idx],
        pair[data.train_idx],
        batch_size=cfg.batch_size,
        device=device,
        seed=cfg.seed,
    )
    val_labels = data.clean_labels if cfg.val_labels == "clean" else data.noisy_labels
    val_batches = None
    if len(data.val_idx):
        val_batches = eval_loader(
            ds,
            rows[data.val_idx],
            val_labels[data.val_idx],
            batch_size=profile.eval_batch_size,
            device=device,
        )
    test_batches = eval_loader(ds, None, None, batch_size=profile.eval_batch_size, device=device)
    transition = validation_transition(
        cfg.noise_type, cfg.noise_rate, ds.num_classes, cfg.dataset, cfg.val_labels
    )

    sums = EpochSums.zeros(device)
    step = TrialStep(net, loss_fn, optimizer, cfg.l1, profile.grad_clip, sums, bf16, device)
    status = "completed"
    for epoch in range(start, cfg.epochs):
        began = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        step.start_epoch()
        for images, labels in train_batches.batches(epoch):
            step(images, labels)
        scheduler.step()
        train_loss = sums.loss.item() / len(train_batches)
        diverged = not math.isfinite(train_loss)
        n_wrong = int(sums.wrong.item())
        tested = not diverged and evaluates_test_set(epoch + 1, cfg)
        metrics = epoch_metrics(
            epoch=epoch + 1,
            train_loss=train_loss,
            noisy_fit=sums.fit.item() / max(len(data.train_idx), 1),
            memorized=sums.memo.item() / n_wrong if n_wrong else math.nan,
            val_counts=confusion(net, val_batches, bf16) if val_batches and not diverged else None,
            test_counts=confusion(net, test_batches, bf16) if tested else None,
            transition=transition,
            lr=lr,
            noise_realised=data.noise_rate,
            epoch_seconds=time.perf_counter() - began,
            bf16=bf16,
        )
        history.append(metrics)
        if report is not None:
            report(metrics, _state(epoch + 1, net, optimizer, scheduler, data, history))
        if diverged:
            status = "diverged"
            break
    return TrialResult(status=status, history=history, data=data)


def import_first_optimizer() -> None:
    """Import what a process's first optimizer imports: torch._dynamo (~0.8 s of Python; torch
    keeps dynamo off `add_param_group` through it). Trials that start together in one process
    would otherwise all wait on that import, while the tracker's set-up competes for the GIL."""
    import torch._dynamo  # noqa: F401


def make_optimizer(model: torch.nn.Module, profile: Profile, cfg: TrialConfig) -> torch.optim.SGD:
    """The profile's SGD (momentum, Nesterov) at the resolved config's lr and weight decay."""
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=profile.momentum,
        nesterov=profile.nesterov,
        weight_decay=cfg.l2,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, profile: Profile, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The profile's lr schedule, stepped once per epoch: cosine to 0 over `epochs`, or steps."""
    if profile.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, profile.step_size, profile.step_gamma)


@dataclass
class EpochSums:
    """What an epoch's steps accumulate on the device, in place (a CUDA graph replays the adds);
    read once, at the epoch's end. Shape (): one trial; (K,): one per member of a pack."""

    loss: torch.Tensor  # Σ batch-mean loss (the L1 term excluded)
    fit: torch.Tensor  # samples predicted as their noisy label
    memo: torch.Tensor  # samples with a wrong noisy label predicted as that label
    wrong: torch.Tensor  # samples with a wrong noisy label

    @classmethod
    def zeros(cls, device: torch.device, shape: tuple[int, ...] = ()) -> EpochSums:
        counts = [torch.zeros(shape, device=device, dtype=torch.long) for _ in range(3)]
        return cls(torch.zeros(shape, device=device), *counts)

    def zero_(self) -> None:
        for total in (self.loss, self.fit, self.memo, self.wrong):
            total.zero_()

    @torch.no_grad()
    def add(
        self, logits: torch.Tensor, loss: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor
    ) -> None:
        """One batch's share, without a device→host sync (logits (…, B, classes), labels (…, B))."""
        hits = logits.argmax(-1) == noisy
        flipped = noisy != clean
        self.loss += loss.detach()
        self.fit += hits.sum(-1)
        self.memo += (hits & flipped).sum(-1)
        self.wrong += flipped.sum(-1)


def train_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer | TensorLrSGD,
    images: torch.Tensor,
    labels: torch.Tensor,
    l1: float,
    grad_clip: float | None,
    sums: EpochSums,
    bf16: bool = False,
) -> None:
    """run_trial's step on one batch: loss, backward, L1, clipping, SGD step; metrics into `sums`.

    `labels` is (B, 2): the noisy label (the target) and the clean one (for memorisation).
    L1 enters as its gradient, l1·sign(θ), added after backward: the gradient of adding
    l1·Σ|θ| to the loss, without building that term's graph (measured on CPU, 1 thread: ~1% of
    a cnn_small step, ~2% of a cnn_cifar one). `sums.loss` gets the loss without the L1 term.
    With a `TensorLrSGD` it is graph-ready (see `graphs.py`): no host sync, and the gradients set
    to None before backward are allocated by it (in a graph's own memory, when captured).
    """
    noisy, clean = labels[:, 0], labels[:, 1]
    with autocast(images, bf16):
        logits = model(images).float()  # the loss in fp32 (a no-op without autocast)
    loss = loss_fn(logits, noisy)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if l1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.add_(p.sign(), alpha=l1)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    sums.add(logits, loss, noisy, clean)


class TensorLrSGD:
    """`optimizer`'s (a torch.optim.SGD: one group, dampening 0) update with its lr read from a
    device tensor, so one CUDA graph serves every epoch: SGD's own step reads a tensor lr back to
    the host (`_to_scalar`: a sync, which capture forbids), and a float lr is frozen into a graph.

    The momentum buffers are the optimizer's own state, so `optimizer.state_dict()` stays the
    checkpoint and `load_state_dict` the resume (build this after loading), and the scheduler
    still sets `param_groups[0]["lr"]`: `set_lr()` copies it into the tensor once an epoch.
    torch's math, step for step: d = g + wd·θ; b = μ·b + d (a zero buffer gives torch's first
    b = d exactly); d = d + μ·b (Nesterov) or b; θ = θ − lr·d, where torch computes θ + (−lr)·d
    (on CPU one fused multiply-add): the last rounding may differ, nothing else.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        (group,) = optimizer.param_groups
        self.optimizer = optimizer
        self.params: list[torch.Tensor] = list(group["params"])
        self.momentum, self.nesterov = group["momentum"], group["nesterov"]
        self.decay = group["weight_decay"]
        first = self.params[0]
        self.lr = torch.tensor(group["lr"], dtype=first.dtype, device=first.device)
        self.buffers = [
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            for p in (self.params if self.momentum else [])
        ]

    def set_lr(self) -> None:
        self.lr.fill_(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if self.decay:
            grads = torch._foreach_add(grads, params, alpha=self.decay)
        if self.momentum:
            buffers = [self.buffers[i] for i in live]
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, grads)
            grads = (
                torch._foreach_add(grads, buffers, alpha=self.momentum)
                if self.nesterov
                else buffers
            )
        torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr))
        # torch's lr schedulers warn unless their optimizer's own step ran: this is its step.
        self.optimizer._opt_called = True


def use_graphs(device: torch.device) -> bool:
    """Whether run_trial's and a pack's steps are graph-ready and captured: on CUDA only. On a
    CPU there is no launch cost to save, and the eager step with torch's SGD stays as it was."""
    return device.type == "cuda"


class TrialStep:
    """run_trial's step per batch (`train_step` on the live model, optimizer and `sums`).

    Where `use_graphs`: graph-ready (a `TensorLrSGD` over `optimizer`) and captured as one CUDA
    graph (`graphs.GraphedStep`); the epoch's last, partial batch runs eagerly on the same
    tensors: one step in ~400 of the embedded default, a few ms an epoch, against a second graph
    to capture and keep. Elsewhere: `train_step` with `optimizer` itself, eagerly, as before.
    Call `start_epoch()` after the scheduler has set the epoch's lr, before its first batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        l1: float,
        grad_clip: float | None,
        sums: EpochSums,
        bf16: bool,
        device: torch.device,
    ) -> None:
        self.sums = sums
        self.sgd = TensorLrSGD(optimizer) if use_graphs(device) else None
        stepper = optimizer if self.sgd is None else self.sgd

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            train_step(model, loss_fn, stepper, images, labels, l1, grad_clip, sums, bf16)

        self.run = GraphedStep(step, capture=self.sgd is not None and device.type == "cuda")

    def start_epoch(self) -> None:
        self.sums.zero_()
        if self.sgd is not None:
            self.sgd.set_lr()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.run(images, labels)


def _image_shape(ds: Any) -> tuple[int, int]:
    if hasattr(ds, "train_images"):
        return int(ds.train_images.shape[1]), int(ds.train_images.shape[-1])
    return 3, int(ds.image_size)


def confusion(model: torch.nn.Module, loader: Any, bf16: bool = False) -> np.ndarray:
    """Counts [label, predicted] of `model` over `loader` in eval mode (one device→host sync):
    the accuracy is their trace over their sum, and the clean-accuracy estimate needs them all."""
    model.eval()
    counts = torch.zeros((), dtype=torch.long)
    k = 0
    with torch.inference_mode():
        for images, labels in loader.batches(0):
            with autocast(images, bf16):
                logits = model(images)
            k = logits.shape[-1]
            pairs = labels * k + logits.argmax(1)
            counts = counts.to(labels.device) + torch.bincount(pairs, minlength=k * k)
    return counts.cpu().numpy().reshape(k, k)


def autocast(images: torch.Tensor, bf16: bool) -> torch.autocast:
    """The forward's precision context: bf16 autocast on the images' device, or a no-op. On CUDA
    without autocast's cache of cast weights, which a captured graph must not hold (torch's CUDA
    graphs notes: autocast under capture needs cache_enabled=False)."""
    cache = images.device.type != "cuda"
    return torch.autocast(images.device.type, torch.bfloat16, enabled=bf16, cache_enabled=cache)


# `precision: auto` on CUDA takes bf16 only for a model whose step, captured as a CUDA graph (as
# run_trial runs it there), was measured faster in bf16: ms per step at batch 128, (fp32, bf16),
# on one H200 with torch 2.11 (../shared/GPU.md, 2026-12-04; `benchmarks/gpu.py` measures them
# again). Eager bf16 was slower for both (cnn_small 2.60 → 3.13 ms, cnn_cifar 4.88 → 5.12): bf16
# autocast adds casts to a launch-bound step. A model not measured here runs fp32 on CUDA.
CUDA_GRAPHED_STEP_MS: dict[str, tuple[float, float]] = {
    "cnn_small": (0.51, 0.52),  # no faster: fp32
    "cnn_cifar": (2.19, 1.75),  # bf16, where its profile allows it (its accuracy measured)
}


def check_precision(
    precision: str, profile: Profile, device: torch.device, model: str | None = None
) -> bool:
    """Whether to run bf16 autocast: as asked, or (`auto`) where the profile allows bf16 (its
    accuracy was measured to be kept) and it was measured to pay for `model` (default: the
    profile's) on `device`: on a CPU with fast bf16 (elsewhere autocast would emulate it, slower
    than fp32), on CUDA per `CUDA_GRAPHED_STEP_MS`. UserError for bf16 on a GPU without it."""
    if precision == "auto":
        if profile.precision != "bf16" or not fast_bf16(device):
            return False
        if device.type != "cuda":
            return True
        fp32_ms, bf16_ms = CUDA_GRAPHED_STEP_MS.get(model or profile.model, (0.0, math.inf))
        return bf16_ms < fp32_ms
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
            "set precision: fp32 or auto"
        )
    return precision == "bf16"


def fast_bf16(device: torch.device) -> bool:
    """CUDA with native bf16 (Ampere on), or a CPU whose oneDNN has bf16 kernels (AVX-512 BF16,
    AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # oneDNN also "supports" bf16 on plain AVX-512 by emulation; only these instructions pay.
    cpu = torch.cpu
    return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()


def _state(
    epoch: int, model: Any, optimizer: Any, scheduler: Any, data: TrialData, history: list[Metrics]
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "label_hash": data.label_hash,
        "history": [dict(m) for m in history],
    }


CHECKPOINT_FILE = "state.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write `state` into `directory` atomically (a crash never leaves a half-written file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


class CheckpointError(Exception):
    """A checkpoint that cannot be read (missing, truncated, or not ours)."""


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read a state written by `save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(directory) / CHECKPOINT_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, wrong format, missing file: all mean "unusable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from err
