"""Packed trials: K configurations of one architecture trained side by side in one process.

`run_packed(configs)` trains each `c` as `run_trial(c)` does: each member is built from its own
seed as `run_trial` builds it, trains on its own noisy labels with its own loss (name and
parameters), lr, L1/L2 and batch order (member k's batches are those of `loaders.train_loader`
with member k's seed), and reports its own metrics per epoch. How exactly (see `train.py`'s
docstring for the general rule):
- Bit for bit: a member's initial weights, batches (images, noisy and clean labels, order,
  augmentation), label hash, `noise_realised`, lr per epoch and epochs run are those of its lone
  run on the same machine (and on others, with `train.py`'s exceptions).
- Per step only, to float rounding: the wide layout's grouped convolutions and batched matmuls
  sum in another order than a lone model's kernels (which order depends on the CPU model, the
  kernels oneDNN picks for it and the thread count), so a step's weights agree with the lone
  step's to a few eps·√n of the update, but for a rare near-tie at a ReLU or max-pool that sends
  a gradient term elsewhere (about 1 fp32 step in 300 of the digits CNN).
- Over many noisy steps, in distribution only: a member and its lone run drift apart as two
  thread counts do (5 of 360 test images after 4 digits epochs on an Intel Xeon; 94.9% against
  93.0% on MNIST on a GPU after 2 epochs). Compare packed and lone results over seeds.
- Bit for bit within one layout (same machine, threads, K and architecture): a member's results do
  not depend on its pack-mates' values (a diverged member's NaNs included), and a pack resumed
  from its checkpoint ends as the uninterrupted pack.

How the members share one computation
- `torch.func.stack_module_state` stacks the K models' parameters and buffers into (K, …) tensors.
- A "wide" copy of the architecture runs all members at once through `torch.func.functional_call`
  with views of those stacked tensors: Conv2d(C→O, groups g) becomes Conv2d(K·C→K·O, groups K·g),
  BatchNorm(C) becomes BatchNorm(K·C) (statistics are per channel, hence per member, and the
  running statistics update the stacked buffers in place), Linear becomes one batched matmul over
  the members. ReLU, pooling, flatten and residual additions act per channel and stay as they are.
  Activations are laid out (B, K·C, H, W) and (B, K·F): member k owns the k-th block of channels.
- Losses, L1 (Σ|θ| per member), gradient clipping (one norm per member) and SGD with momentum act
  per member; the summed loss gives each member exactly its own gradient.

Speed (benchmarks/packed.py): on CPU a member's step costs about what it costs alone up to K = 4
and somewhat more at K = 8 (activations outgrow the caches); what packing saves is the per-process
start-up, the copies of the data and the process memory, once per pack instead of once per trial.

Why not `vmap`: on a 2-CPU machine, `vmap(functional_call(...))` over the embedded default's CNN
cost 2.5–3.5× more per member and step than training the members one by one (its pooling and
BatchNorm rules move the member dimension between batch and channel at every layer, copying),
while the wide layout above — the one vmap's convolution rule builds, kept from layer to layer —
costs about the same as one by one.

Conventions and edge cases
- Members must agree on `SHARED_FIELDS` (one architecture, one dataset and split, one schedule
  length and batch size, one device); anything else may differ. Otherwise: UserError.
- Only in-memory datasets (`data.ImageSet`) can be packed: members share one copy of the images.
- `report(metrics, state)` is called after every epoch: `metrics` maps each member that trained
  that epoch to `run_trial`'s metric keys (`epoch_seconds` is the whole pack's epoch); `state` is
  the pack's checkpoint (stacked weights, momentum, histories; its tensors alias the live ones:
  save or copy them before returning). `run_packed(configs, resume=state)` continues from it, and
  `member_model(state, i)` is member i's model state dict.
- A member whose epoch loss is NaN/inf ends with status "diverged" and reports no more; its
  computation continues inside the pack (members never exchange values), unobserved.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from jal_search.config import TrialConfig
from jal_search.data import IN_MEMORY_DATASETS, ImageSet
from jal_search.errors import UserError
from jal_search.loaders import Loader, TensorLoader, eval_loader
from jal_search.losses import build_loss
from jal_search.metrics import epoch_metrics
from jal_search.models import build_model
from jal_search.noise import validation_transition
from jal_search.profiles import Profile, get_profile
from jal_search.train import (
    Metrics,
    TrialData,
    TrialResult,
    autocast,
    check_precision,
    make_scheduler,
    pick_device,
    prepare_data,
)

PackedReport = Callable[[dict[int, Metrics], dict[str, Any]], None]

SHARED_FIELDS = (
    "dataset",
    "data_root",
    "train_subset",
    "model",
    "epochs",
    "batch_size",
    "val_fraction",
    "device",
    "threads",
    "precision",
)

# Layers without parameters that act on each channel (or element) alone: valid in the wide layout.
_PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def run_packed(
    configs: Sequence[TrialConfig],
    report: PackedReport | None = None,
    resume: dict[str, Any] | None = None,
) -> list[TrialResult]:
    """Train `configs` as one pack; return one TrialResult per config, in order.

    `resume` is a state given to `report`: training continues after its epoch.
    """
    cfgs = check_packable(configs)
    first = cfgs[0]
    if first.threads:
        torch.set_num_threads(first.threads)
    device = pick_device(first.device)
    data = [prepare_data(c) for c in cfgs]
    ds = data[0].dataset
    if not isinstance(ds, ImageSet):
        raise UserError(
            f"dataset: {ds.name} is read from files; packed trials need an in-memory dataset "
            f"({', '.join(IN_MEMORY_DATASETS)}): run these configs one by one"
        )
    profile = get_profile(first.dataset)
    k = len(cfgs)

    shape = int(ds.train_images.shape[1]), int(ds.train_images.shape[-1])
    members = []
    with torch.random.fork_rng(devices=[]):  # seed as run_trial does, without leaking the state
        for c in cfgs:
            torch.manual_seed(c.seed)
            members.append(build_model(c.model, ds.num_classes, *shape).to(device))
    pack = Pack(members)
    step = _Step(
        pack,
        [build_loss(c.loss, ds.num_classes, **c.loss_params) for c in cfgs],
        _StackedSGD(pack.parameters(), profile, [c.l2 for c in cfgs]),
        torch.tensor([c.l1 for c in cfgs], device=device),
        profile.grad_clip,
        check_precision(first.precision, profile, device),
    )
    rates = [_learning_rates(c, profile) for c in cfgs]
    loaders, val_batches, test_batches = _loaders(cfgs, data, device, profile)
    n_train = len(data[0].train_idx)

    histories: list[list[Metrics]] = [[] for _ in cfgs]
    status = ["completed"] * k
    active = list(range(k))
    start = 0
    if resume is not None:
        start, histories, status, active = _restore(resume, pack, step.optimizer, data)
    for epoch in range(start, first.epochs):
        began = time.perf_counter()
        lr = [r[epoch] for r in rates]
        sums = step.epoch(_joined(loaders, epoch, pack), torch.tensor(lr, device=device))
        train_loss = [s / max(sums.batches, 1) for s in sums.loss.tolist()]
        finite = [i for i in active if math.isfinite(train_loss[i])]
        val = _confusions(pack, val_batches, step.bf16) if val_batches and finite else [None] * k
        test = _confusions(pack, test_batches, step.bf16) if finite else [None] * k
        fit, memo, wrong = sums.fit.tolist(), sums.memo.tolist(), sums.wrong.tolist()
        seconds = time.perf_counter() - began
        reported: dict[int, Metrics] = {}
        for i in active:
            metrics = epoch_metrics(
                epoch=epoch + 1,
                train_loss=train_loss[i],
                noisy_fit=fit[i] / max(n_train, 1),
                memorized=memo[i] / wrong[i] if wrong[i] else math.nan,
                val_counts=val[i],
                test_counts=test[i],
                transition=validation_transition(
                    cfgs[i].noise_type,
                    cfgs[i].noise_rate,
                    ds.num_classes,
                    cfgs[i].dataset,
                    cfgs[i].val_labels,
                ),
                lr=lr[i],
                noise_realised=data[i].noise_rate,
                epoch_seconds=seconds,
                bf16=step.bf16,
            )
            histories[i].append(metrics)
            reported[i] = metrics
            if metrics["diverged"]:
                status[i] = "diverged"
        active = finite
        if report is not None:
            report(
                reported, _state(epoch + 1, pack, step.optimizer, data, histories, status, active)
            )
        if not active:
            break
    return [
        TrialResult(status=s, history=h, data=d)
        for s, h, d in zip(status, histories, data, strict=True)
    ]


# Packs that `jal-search evaluate` forms on its own stay at most this large: a pack's members
# train in one process, one after the other's step, so a larger pack trades wall time for CPU time
# (on CPU a member's epoch costs 1.00×, 1.06×, 1.04× its cost alone at K = 2, 4, 8).
AUTO_PACK_MAX = 4


def auto_pack_size(trainings: int, slots: float) -> int:
    """Members per pack for `trainings` runs on `slots` concurrent tasks: enough packs to keep
    every slot busy, each as large as that allows up to AUTO_PACK_MAX."""
    return max(1, min(AUTO_PACK_MAX, math.ceil(trainings / max(slots, 1.0))))


def group_packs(configs: Sequence[TrialConfig], size: int) -> list[list[int]]:
    """Indices of `configs` in packs of at most `size` members that can train together: configs
    that agree on SHARED_FIELDS, on an in-memory dataset; any other config trains alone."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(configs):
        r = c.resolve()
        key = (
            (i,)
            if r.dataset not in IN_MEMORY_DATASETS
            else tuple(getattr(r, f) for f in SHARED_FIELDS)
        )
        groups.setdefault(key, []).append(i)
    return [g[j : j + size] for g in groups.values() for j in range(0, len(g), size)]


def check_packable(configs: Sequence[TrialConfig]) -> list[TrialConfig]:
    """The resolved configs, or UserError when they cannot share one pack."""
    if not configs:
        raise UserError("configs: a pack needs at least one TrialConfig")
    cfgs = [c.resolve() for c in configs]
    if any(c.compile for c in cfgs):
        raise UserError("compile: packed trials run uncompiled; set compile: false or pack: 1")
    for i, c in enumerate(cfgs[1:], start=1):
        for name in SHARED_FIELDS:
            mine, theirs = getattr(c, name), getattr(cfgs[0], name)
            if mine != theirs:
                raise UserError(
                    f"configs[{i}].{name}: {mine!r} differs from configs[0].{name} {theirs!r}; "
                    f"a pack shares {', '.join(SHARED_FIELDS)}: split the configs into packs "
                    "that agree on them"
                )
    return cfgs


# ---------------------------------------------------------------------------------- the pack


class Pack:
    """K models of one architecture as stacked tensors, run together in the wide layout."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.k = len(members)
        params, buffers = stack_module_state(list(members))
        self.channels_last = _prefers_channels_last(members[0])
        # Conv weights whose members are channels-last are stored so that their wide views are
        # channels-last too: oneDNN then runs the grouped convolutions channels-last.
        self.params = {
            n: _channels_last_stack(p) if self.channels_last and p.ndim == 5 else p
            for n, p in params.items()
        }
        self.buffers = buffers
        self.keys = list(members[0].state_dict())
        self.wide = _widen(members[0], self.k)
        self._linear = {n for n, m in self.wide.named_modules() if isinstance(m, _PackedLinear)}
        # BatchNorm counts its steps in num_batches_tracked; members step together, so one counter
        # per layer stands for all of them.
        self.counts = {n: v[0].clone() for n, v in buffers.items() if _is_count(n)}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> None:
        self.wide.train(mode)

    def eval(self) -> None:
        self.wide.train(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K·C, H, W) or (B, K·F) inputs → (K, B, classes) logits."""
        out = functional_call(self.wide, self._wide_tensors(), (x,))
        return out.view(len(x), self.k, -1).transpose(0, 1)

    def join(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """K member batches (B, C, …) → one wide batch (B, K·C, …)."""
        if self.channels_last:
            # Built in (B, H, W, K·C) memory, so the strides say channels-last even when K·C = 1
            # (where both layouts fit and oneDNN would otherwise pick the slower NCHW kernels).
            x = torch.stack([im.movedim(1, -1) for im in images], dim=-2)
            return x.flatten(-2).movedim(-1, 1)
        return torch.stack(list(images), dim=1).flatten(1, 2)

    def repeat(self, images: torch.Tensor) -> torch.Tensor:
        """One batch (B, C, …) that every member sees → (B, K·C, …)."""
        if self.channels_last:
            return images.movedim(1, -1).repeat(1, 1, 1, self.k).movedim(-1, 1)
        return images.repeat(1, self.k, *[1] * (images.ndim - 2))

    @torch.no_grad()
    def add_l1_grad_(self, l1: torch.Tensor) -> None:
        """Add the gradient of l1[k]·Σ|θ_k| (that is l1[k]·sign(θ_k)) to each member's gradient.

        The same values as adding the term to the loss before backward, as upstream does, without
        building its graph (measured: the graph cost ~10% of a step of the embedded default).
        """
        for p in self.params.values():
            if p.grad is not None:
                p.grad.add_(p.sign() * _per_member(l1, p))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` for each member alone; returns the (K,) norms."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(_per_member(coef, g))
        return norms

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's state dict (the keys of its model's), aliasing the stacked tensors."""
        return _member_view(self.keys, {**self.params, **self.buffers, **self.counts}, i)

    def _wide_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in (*self.params.items(), *self.buffers.items()):
            owner = name.rpartition(".")[0]
            if _is_count(name):
                out[name] = self.counts[name]
            elif owner in self._linear:
                out[name] = t  # _PackedLinear takes its (K, …) tensors as they are
            else:
                out[name] = t.flatten(0, 1)  # a view: running statistics update in place
        return out


class _PackedLinear(nn.Module):
    """K Linear layers side by side: (B, K·F) → (B, K·O), member k on the k-th block."""

    def __init__(self, k: int, bias: bool) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(0, device="meta"))  # (K, O, F) at call time
        self.bias = nn.Parameter(torch.empty(0, device="meta")) if bias else None  # (K, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = len(x)
        members = x.reshape(b, self.k, -1).transpose(0, 1)
        if self.bias is None:
            out = torch.bmm(members, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), members, self.weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(b, -1)


def _widen(model: nn.Module, k: int) -> nn.Module:
    """The wide form of `model` for k members, on the meta device (tensors come from the pack)."""
    wide = copy.deepcopy(model).to("meta")
    for name, module in list(wide.named_modules()):
        replacement = _wide_layer(module, k)
        if replacement is None:
            continue
        if not name:
            return replacement
        parent, _, child = name.rpartition(".")
        setattr(wide.get_submodule(parent), child, replacement)
    return wide


def _wide_layer(m: nn.Module, k: int) -> nn.Module | None:
    """The wide replacement of one layer; None for layers that work as they are."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(
            k * m.in_channels,
            k * m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            groups=k * m.groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            device="meta",
        )
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        return type(m)(
            k * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device="meta"
        )
    if isinstance(m, nn.Linear):
        return _PackedLinear(k, bias=m.bias is not None)
    own = [*m._parameters, *m._buffers]
    if own or (not any(True for _ in m.children()) and not isinstance(m, _PER_CHANNEL)):
        # A model registry change, not a user mistake: packing must learn the new layer.
        raise TypeError(f"packed training does not know the layer {type(m).__name__}")
    return None


def _is_count(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def _prefers_channels_last(model: nn.Module) -> bool:
    """Whether the model keeps conv weights channels-last (a 1-channel weight is both layouts)."""
    return any(
        m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    )


def _channels_last_stack(p: torch.Tensor) -> torch.Tensor:
    """(K, O, C, kh, kw) stored so that its (K·O, C, kh, kw) view is channels-last."""
    k, o, c, h, w = p.shape
    out = p.new_empty(k, o, h, w, c).permute(0, 1, 4, 2, 3)
    out.copy_(p)
    return out.detach().requires_grad_(p.requires_grad)


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) values shaped to broadcast over a (K, …) tensor."""
    return values.view(-1, *[1] * (like.ndim - 1)).to(like.dtype)


# -------------------------------------------------------------------------- training step


@dataclass
class _Sums:
    """One epoch's per-member sums, kept on the device until the epoch ends."""

    loss: torch.Tensor  # (K,) float: Σ batch-mean losses (L1 excluded)
    fit: torch.Tensor  # (K,) long: predictions equal to the noisy label
    memo: torch.Tensor  # (K,) long: ... where that label is wrong
    wrong: torch.Tensor  # (K,) long: wrong labels seen
    batches: int = 0


@dataclass
class _Step:
    """run_trial's inner loop for all members: loss, L1, clipping, SGD, metrics."""

    pack: Pack
    losses: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    optimizer: _StackedSGD
    l1: torch.Tensor  # (K,)
    grad_clip: float | None
    bf16: bool

    def epoch(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], lr: torch.Tensor
    ) -> _Sums:
        k, device = self.pack.k, self.l1.device
        counts = [torch.zeros(k, dtype=torch.long, device=device) for _ in range(3)]
        sums = _Sums(torch.zeros(k, device=device), *counts)
        use_l1 = bool(self.l1.any())
        self.pack.train()
        for images, labels in batches:
            noisy, clean = labels[..., 0], labels[..., 1]  # (K, B) each
            with autocast(images, self.bf16):
                logits = self.pack(images).float()
            loss = torch.stack([fn(logits[i], noisy[i]) for i, fn in enumerate(self.losses)])
            self.optimizer.zero_grad()
            loss.sum().backward()  # members are independent: each gets its own loss's gradient
            if use_l1:
                self.pack.add_l1_grad_(self.l1)
            if self.grad_clip is not None:
                self.pack.clip_grad_norm_(self.grad_clip)
            self.optimizer.step(lr)
            with torch.no_grad():
                hits = logits.argmax(-1) == noisy
                flipped = noisy != clean
                sums.loss += loss.detach()
                sums.fit += hits.sum(1)
                sums.memo += (hits & flipped).sum(1)
                sums.wrong += flipped.sum(1)
            sums.batches += 1
        return sums


# -------------------------------------------------------------------------- optimiser, data


class _StackedSGD:
    """torch.optim.SGD (momentum, dampening 0, optional Nesterov) per member on (K, …) tensors,
    with per-member learning rates and weight decays, step for step as torch's single-tensor code.
    """

    def __init__(self, params: list[torch.Tensor], profile: Profile, weight_decay: list[float]):
        self.params = params
        self.momentum, self.nesterov = profile.momentum, profile.nesterov
        self.weight_decay = torch.tensor(weight_decay, device=params[0].device)
        self.decay = any(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        for j, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.decay:
                grad = grad + p * _per_member(self.weight_decay, p)
            if self.momentum:
                buf = self.buffers[j]
                if buf is None:
                    buf = self.buffers[j] = grad.clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.sub_(grad * _per_member(lr, p))


def _learning_rates(cfg: TrialConfig, profile: Profile) -> list[float]:
    """Each epoch's lr from torch's own scheduler, built as run_trial builds it (same floats)."""
    probe = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([probe], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, profile, cfg.epochs)
    rates = []
    for _ in range(cfg.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient, so a no-op; keeps the scheduler's call-order check quiet
        scheduler.step()
    return rates


def _loaders(
    cfgs: list[TrialConfig], data: list[TrialData], device: torch.device, profile: Profile
) -> tuple[list[TensorLoader], Loader | None, Loader]:
    """Per-member train loaders over one shared image tensor; shared validation and test loaders.

    Member k's loader is `loaders.train_loader(...)` with member k's labels and seed, so its batches
    are exactly those of member k's own trial. Validation carries one label column per member.
    """
    ds = data[0].dataset
    rows = data[0].image_index
    for i, d in enumerate(data[1:], start=1):  # guaranteed by the shared fields; checked anyway
        same = (
            np.array_equal(d.image_index, rows)
            and np.array_equal(d.train_idx, data[0].train_idx)
            and np.array_equal(d.val_idx, data[0].val_idx)
        )
        if not same:
            raise UserError(f"configs[{i}]: its training/validation split differs from configs[0]")
    train_rows, val_rows = rows[data[0].train_idx], rows[data[0].val_idx]
    images = ds.train_images[torch.from_numpy(train_rows)].to(device)
    loaders = [
        TensorLoader(
            images,
            torch.stack([d.noisy_labels, d.clean_labels], dim=1)[d.train_idx],
            mean=ds.mean,
            std=ds.std,
            augment=ds.augment,
            batch_size=c.batch_size,
            shuffle=True,
            seed=c.seed,
            device=device,
        )
        for c, d in zip(cfgs, data, strict=True)
    ]
    val = None
    if len(val_rows):
        labels = torch.stack(
            [
                (d.clean_labels if c.val_labels == "clean" else d.noisy_labels)
                for c, d in zip(cfgs, data, strict=True)
            ],
            dim=1,
        )[data[0].val_idx]
        val = eval_loader(ds, val_rows, labels, batch_size=profile.eval_batch_size, device=device)
    test = eval_loader(ds, None, None, batch_size=profile.eval_batch_size, device=device)
    return loaders, val, test


def _joined(
    loaders: list[TensorLoader], epoch: int, pack: Pack
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's member batches as one wide batch and (K, B, 2) labels."""
    for step in zip(*(loader.batches(epoch) for loader in loaders), strict=True):
        yield pack.join([images for images, _ in step]), torch.stack([y for _, y in step])


def _confusions(pack: Pack, loader: Loader, bf16: bool) -> list[np.ndarray | None]:
    """Per member, confusion counts [label, predicted] (`train.confusion`); labels are (N,)
    shared or (N, K) one column per member."""
    pack.eval()
    counts = torch.zeros((), dtype=torch.long)
    classes = 0
    with torch.inference_mode():
        for images, labels in loader.batches(0):
            # K members see each image: split the batch so a pass holds about one batch's worth.
            chunk = math.ceil(len(images) / pack.k)
            with autocast(images, bf16):
                logits = [pack(pack.repeat(x)) for x in images.split(chunk)]
            classes = logits[0].shape[-1]
            predicted = torch.cat([part.argmax(-1) for part in logits], 1)
            target = labels.T if labels.ndim == 2 else labels
            pairs = (
                target * classes
                + predicted
                + classes * classes * torch.arange(pack.k, device=predicted.device)[:, None]
            )
            size = pack.k * classes * classes
            counts = counts.to(labels.device) + torch.bincount(pairs.flatten(), minlength=size)
    return list(counts.cpu().numpy().reshape(pack.k, classes, classes))


# ------------------------------------------------------------------------------ checkpoints


def _state(
    epoch: int,
    pack: Pack,
    optimizer: _StackedSGD,
    data: list[TrialData],
    histories: list[list[Metrics]],
    status: list[str],
    active: list[int],
) -> dict[str, Any]:
    """The pack's checkpoint after `epoch`: plain tensors, lists and strings (weights_only)."""
    return {
        "epoch": epoch,
        "keys": pack.keys,
        "params": {n: p.detach() for n, p in pack.params.items()},
        "buffers": dict(pack.buffers),
        "counts": dict(pack.counts),
        "momentum": list(optimizer.buffers),
        "label_hashes": [d.label_hash for d in data],
        "histories": [[dict(m) for m in h] for h in histories],
        "status": list(status),
        "active": list(active),
    }


def _restore(
    state: dict[str, Any], pack: Pack, optimizer: _StackedSGD, data: list[TrialData]
) -> tuple[int, list[list[Metrics]], list[str], list[int]]:
    """Load a `_state` into the pack and optimiser; returns epoch, histories, status, active."""
    hashes = [d.label_hash for d in data]
    if state["label_hashes"] != hashes or list(state["params"]) != list(pack.params):
        raise UserError(
            "resume: the checkpoint is of another pack (other members, noisy labels or model); "
            "start the trial afresh"
        )
    with torch.no_grad():
        for n, p in pack.params.items():
            p.copy_(state["params"][n])
        for n, b in pack.buffers.items():
            b.copy_(state["buffers"][n])
        for n, c in pack.counts.items():
            c.copy_(state["counts"][n])
    optimizer.buffers = [
        None if m is None else m.detach().to(p.device, copy=True)
        for m, p in zip(state["momentum"], optimizer.params, strict=True)
    ]
    histories = [[dict(m) for m in h] for h in state["histories"]]
    return int(state["epoch"]), histories, list(state["status"]), list(state["active"])


def member_model(state: dict[str, Any], i: int) -> dict[str, torch.Tensor]:
    """Member i's model state dict from a pack checkpoint (views of its stacked tensors)."""
    return _member_view(
        state["keys"], {**state["params"], **state["buffers"], **state["counts"]}, i
    )


def _member_view(
    keys: list[str], stacked: dict[str, torch.Tensor], i: int
) -> dict[str, torch.Tensor]:
    return {n: stacked[n] if _is_count(n) else stacked[n][i].detach() for n in keys}
