"""Packed trials: K configurations of one architecture trained side by side in one process.

`PackTrainer` holds the members; they join and leave between epochs, each at its own epoch (a
pack worker refills a slot ASHA freed with a new trial). `run_packed(configs)` trains a fixed set
to the end. Each member `c` trains as `run_trial(c)` does: each member is built from its own
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
  from its members' checkpoints ends as the uninterrupted pack. A member whose pack changes size
  on the way (mates leaving, joining) runs each epoch in that epoch's layout: to rounding.

How the members share one computation
- The K members' parameters and buffers are stacked into (K, …) tensors (re-stacked when members
  join or leave: their own tensors are kept while they are out of the pack).
- A "wide" copy of the architecture runs all members at once through `torch.func.functional_call`
  with views of those stacked tensors: Conv2d(C→O, groups g) becomes Conv2d(K·C→K·O, groups K·g),
  BatchNorm(C) becomes BatchNorm(K·C) (statistics are per channel, hence per member, and the
  running statistics update the stacked buffers in place), Linear becomes one batched matmul over
  the members. ReLU, pooling, flatten and residual additions act per channel and stay as they are.
  Activations are laid out (B, K·C, H, W) and (B, K·F): member k owns the k-th block of channels.
- Losses, L1 (Σ|θ| per member), gradient clipping (one norm per member) and SGD with momentum act
  per member; the summed loss gives each member exactly its own gradient.
- On CUDA a layout's step is captured once as a CUDA graph and replayed per batch (`_Step`,
  `graphs.py`); a new layout is captured anew.

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
- A member's checkpoint (`PackTrainer.state`: its weights, SGD momentum, epoch, history, status;
  tensors alias the live ones: save or copy them before the next epoch) is its own, whatever pack
  it trained in: `PackTrainer.add(config, resume=state)` continues it in any pack.
- `run_packed`'s `report(metrics, state)` is called after every epoch: `metrics` maps each member
  that trained that epoch to `run_trial`'s metric keys (`epoch_seconds` is the whole pack's
  epoch); `state` holds every member's checkpoint. `run_packed(configs, resume=state)` continues.
- A member whose epoch loss is NaN/inf ends with status "diverged" and reports no more; in
  `run_packed` its computation continues inside the pack (members never exchange values),
  unobserved, so its mates' layout stays the same.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from jal_search.config import TrialConfig
from jal_search.data import IN_MEMORY_DATASETS, ImageSet
from jal_search.errors import UserError
from jal_search.graphs import GraphedStep
from jal_search.loaders import Loader, TensorLoader, eval_loader
from jal_search.losses import build_loss
from jal_search.metrics import epoch_metrics, evaluates_test_set
from jal_search.models import build_model, global_rng_seeded
from jal_search.noise import validation_transition
from jal_search.profiles import Profile, get_profile
from jal_search.train import (
    EpochSums,
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
    """Train `configs` as one pack to the end; return one TrialResult per config, in order.

    `report(metrics, state)` after every epoch: `metrics` maps each member that trained and is
    not diverged to its metrics; `state` is `{"members": [member checkpoint, …]}` (`state`'s).
    `resume` is such a state: every member continues after its own epoch.
    """
    cfgs = check_packable(configs)
    if resume is not None and len(resume["members"]) != len(cfgs):
        raise UserError("resume: the checkpoint is of another pack (another number of members)")
    trainer = PackTrainer(cfgs[0])
    keys = [
        trainer.add(c, None if resume is None else resume["members"][i]) for i, c in enumerate(cfgs)
    ]
    while any(trainer.members[k].status == "training" for k in keys):
        # Diverged members keep computing, unobserved: the others' layout stays the same.
        metrics = trainer.train_epoch([k for k in keys if trainer.trainable(k)])
        if report is not None:
            report(
                {keys.index(k): m for k, m in metrics.items()},
                {"members": [trainer.state(k) for k in keys]},
            )
    return [trainer.result(k) for k in keys]


@dataclass
class _Member:
    """One config in a pack trainer: its own labels, loss, lr schedule, batches and progress.
    Its weights and momentum live here while it is not stacked in the trainer's pack."""

    config: TrialConfig
    data: TrialData
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rates: list[float]  # lr per epoch, as run_trial's scheduler gives them
    loader: TensorLoader
    weights: dict[str, torch.Tensor]  # the model's state dict
    momentum: dict[str, torch.Tensor]  # SGD's buffer per parameter name, once it has one
    transition: np.ndarray | None  # its validation labels' T (`noise.validation_transition`)
    history: list[Metrics] = field(default_factory=list)
    status: str = "training"  # then "completed" or "diverged"
    epoch: int = 0  # epochs trained (a diverged member's unobserved ones included)


class PackTrainer:
    """Configs of one architecture trained side by side, each at its own epoch.

    Members join (`add`) and leave (`remove`) between epochs; `train_epoch(keys)` trains each of
    the given members its own next epoch (its lr, its batches) in one pack and returns their
    metrics. The pack is re-stacked only when the set it trains changes; a member's course
    depends on its pack-mates only through the layout's rounding (the pack's size).
    """

    def __init__(self, shared: TrialConfig) -> None:
        self.shared = check_packable([shared])[0]
        if self.shared.threads:
            torch.set_num_threads(self.shared.threads)
        self.device = pick_device(self.shared.device)
        self.profile = get_profile(self.shared.dataset)
        self.members: dict[int, _Member] = {}
        self._keys = 0
        self._stacked: list[int] = []  # the members in the pack, in order
        self._pack: Pack | None = None
        self._step: _Step | None = None
        self._val: Loader | None = None
        self._first: TrialData | None = None  # the split every member must share
        self._template: nn.Module | None = None
        self._images: torch.Tensor | None = None
        self._test: Loader | None = None
        self.bf16 = check_precision(
            self.shared.precision, self.profile, self.device, self.shared.model
        )

    def add(self, config: TrialConfig, resume: dict[str, Any] | None = None) -> int:
        """A new member (from its checkpoint, a `state`, when given); returns its key."""
        cfg = check_packable([self.shared, config])[1]
        data = prepare_data(cfg)
        ds = data.dataset
        if not isinstance(ds, ImageSet):
            raise UserError(
                f"dataset: {ds.name} is read from files; packed trials need an in-memory dataset "
                f"({', '.join(IN_MEMORY_DATASETS)}): run these configs one by one"
            )
        self._share_split(data)
        shape = int(ds.train_images.shape[1]), int(ds.train_images.shape[-1])
        with global_rng_seeded(cfg.seed):  # as run_trial builds it
            model = build_model(cfg.model, ds.num_classes, *shape).to(self.device)
        if self._template is None:
            self._template = model
        weights = {n: t.detach() for n, t in model.state_dict().items()}
        member = _Member(
            config=cfg,
            data=data,
            loss=build_loss(cfg.loss, ds.num_classes, **cfg.loss_params),
            rates=_learning_rates(cfg, self.profile),
            loader=TensorLoader(
                self._images,
                torch.stack([data.noisy_labels, data.clean_labels], dim=1)[data.train_idx],
                mean=ds.mean,
                std=ds.std,
                augment=ds.augment,
                batch_size=cfg.batch_size,
                shuffle=True,
                seed=cfg.seed,
                device=self.device,
            ),
            weights=weights,
            momentum={},
            transition=validation_transition(
                cfg.noise_type, cfg.noise_rate, ds.num_classes, cfg.dataset, cfg.val_labels
            ),
        )
        if resume is not None:
            _restore(member, resume, self.device)
        self._keys += 1
        self.members[self._keys] = member
        return self._keys

    def remove(self, key: int) -> None:
        if key in self._stacked:
            self._unstack()
        del self.members[key]

    def trainable(self, key: int) -> bool:
        """Whether the member has epochs left (a diverged one too: it runs on, unobserved)."""
        m = self.members[key]
        return m.status != "completed" and m.epoch < m.config.epochs

    def train_epoch(self, keys: Sequence[int]) -> dict[int, Metrics]:
        """One epoch of each member in `keys` (trainable ones), together; the metrics of those
        not diverged before it. A member whose loss turns NaN/inf is "diverged" from then on."""
        keys = [k for k in keys if self.trainable(k)]
        if not keys:
            return {}
        if keys != self._stacked:
            self._restack(keys)
        assert self._pack is not None and self._step is not None
        members = [self.members[k] for k in keys]
        began = time.perf_counter()
        lr = [m.rates[m.epoch] for m in members]
        batches = _joined([m.loader for m in members], [m.epoch for m in members], self._pack)
        sums = self._step.epoch(batches, torch.tensor(lr, device=self.device))
        train_loss = [s / len(members[0].loader) for s in sums.loss.tolist()]
        observed = [i for i, m in enumerate(members) if m.status == "training"]
        finite = any(math.isfinite(train_loss[i]) for i in observed)
        none = [None] * len(keys)
        val = _confusions(self._pack, self._val, self.bf16) if self._val and finite else none
        # The pack evaluates the test set for all or none; a member keeps it where it asks.
        tested = [evaluates_test_set(m.epoch + 1, m.config) for m in members]
        test = _confusions(self._pack, self._test, self.bf16) if finite and any(tested) else none
        fit, memo, wrong = sums.fit.tolist(), sums.memo.tolist(), sums.wrong.tolist()
        seconds = time.perf_counter() - began
        out: dict[int, Metrics] = {}
        for i, (key, m) in enumerate(zip(keys, members, strict=True)):
            m.epoch += 1
            if i not in observed:
                continue
            metrics = epoch_metrics(
                epoch=m.epoch,
                train_loss=train_loss[i],
                noisy_fit=fit[i] / max(len(m.data.train_idx), 1),
                memorized=memo[i] / wrong[i] if wrong[i] else math.nan,
                val_counts=val[i],
                test_counts=test[i] if tested[i] else None,
                transition=m.transition,
                lr=lr[i],
                noise_realised=m.data.noise_rate,
                epoch_seconds=seconds,
                bf16=self.bf16,
            )
            m.history.append(metrics)
            if metrics["diverged"]:
                m.status = "diverged"
            elif m.epoch >= m.config.epochs:
                m.status = "completed"
            out[key] = metrics
        return out

    def state(self, key: int) -> dict[str, Any]:
        """Member `key`'s checkpoint: plain tensors, lists and strings (weights_only). Its
        tensors alias the live ones: save or copy them before the next epoch."""
        m = self.members[key]
        weights, momentum = m.weights, m.momentum
        if key in self._stacked:
            weights, momentum = self._member(self._stacked.index(key))
        return {
            "epoch": m.epoch,
            "model": weights,
            "momentum": momentum,
            "label_hash": m.data.label_hash,
            "history": [dict(h) for h in m.history],
            "status": m.status,
        }

    def result(self, key: int) -> TrialResult:
        m = self.members[key]
        status = "diverged" if m.status == "diverged" else "completed"
        return TrialResult(status=status, history=list(m.history), data=m.data)

    def _share_split(self, data: TrialData) -> None:
        """The first member's images move to the device once; later ones must share its split."""
        first = self._first
        if first is None:
            self._first = data
            ds, rows = data.dataset, data.image_index
            self._images = ds.train_images[torch.from_numpy(rows[data.train_idx])].to(self.device)
            self._test = eval_loader(
                ds, None, None, batch_size=self.profile.eval_batch_size, device=self.device
            )
            return
        same = (
            np.array_equal(data.image_index, first.image_index)
            and np.array_equal(data.train_idx, first.train_idx)
            and np.array_equal(data.val_idx, first.val_idx)
        )
        if not same:  # guaranteed by the shared fields; checked anyway
            raise UserError("configs: a member's training/validation split differs from the pack's")

    def _member(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Weights and momentum of the pack's i-th member (views of the stacked tensors)."""
        assert self._pack is not None and self._step is not None
        names = list(self._pack.params)
        buffers = self._step.optimizer.buffers
        momentum = {n: b[i] for n, b in zip(names, buffers, strict=True) if b is not None}
        return self._pack.member_state(i), momentum

    def _unstack(self) -> None:
        """Copy each stacked member's weights and momentum back into its own tensors."""
        for i, key in enumerate(self._stacked):
            if key in self.members:
                weights, momentum = self._member(i)
                m = self.members[key]
                m.weights = {n: t.clone() for n, t in weights.items()}
                m.momentum = {n: t.clone() for n, t in momentum.items()}
        self._stacked, self._pack, self._step, self._val = [], None, None, None

    def _restack(self, keys: list[int]) -> None:
        self._unstack()
        assert self._template is not None and self._first is not None
        members = [self.members[k] for k in keys]
        pack = Pack(self._template, [m.weights for m in members])
        momentum = [
            torch.stack([m.momentum.get(n, torch.zeros_like(p[0])) for m in members])
            if any(n in m.momentum for m in members)
            else None  # a fresh member's zeros give exactly its first step: 0·μ + g = g
            for n, p in pack.params.items()
        ]
        optimizer = _StackedSGD(
            pack.parameters(), self.profile, [m.config.l2 for m in members], momentum
        )
        self._step = _Step(
            pack,
            [m.loss for m in members],
            optimizer,
            torch.tensor([m.config.l1 for m in members], device=self.device),
            self.profile.grad_clip,
            self.bf16,
        )
        first = self._first
        if len(first.val_idx):
            labels = torch.stack(
                [
                    m.data.clean_labels if m.config.val_labels == "clean" else m.data.noisy_labels
                    for m in members
                ],
                dim=1,
            )[first.val_idx]
            rows = first.image_index[first.val_idx]
            self._val = eval_loader(
                first.dataset,
                rows,
                labels,
                batch_size=self.profile.eval_batch_size,
                device=self.device,
            )
        self._pack, self._stacked = pack, list(keys)


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

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """`states`: the members' state dicts (those of `template`'s architecture)."""
        self.k = len(states)
        names = dict(template.named_parameters())
        stacked = {n: torch.stack([s[n].detach() for s in states]) for n in states[0]}
        self.channels_last = _prefers_channels_last(template)
        # Conv weights whose members are channels-last are stored so that their wide views are
        # channels-last too: oneDNN then runs the grouped convolutions channels-last.
        self.params = {
            n: (_channels_last_stack(t) if self.channels_last and t.ndim == 5 else t)
            .detach()
            .requires_grad_()
            for n, t in stacked.items()
            if n in names
        }
        self.buffers = {n: t for n, t in stacked.items() if n not in names}
        self.keys = list(states[0])
        self.wide = _widen(template, self.k)
        self._linear = {n for n, m in self.wide.named_modules() if isinstance(m, _PackedLinear)}
        # BatchNorm counts its steps in num_batches_tracked; members step together, so one counter
        # per layer stands for all of them, and each member's own is its count plus the steps here.
        self.counts = {n: v[0].clone() for n, v in self.buffers.items() if _is_count(n)}
        self._counted = {n: c.clone() for n, c in self.counts.items()}

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
        stacked = {**self.params, **self.buffers}
        return {
            n: stacked[n][i] + (self.counts[n] - self._counted[n])
            if _is_count(n)
            else stacked[n][i].detach()
            for n in self.keys
        }

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
    return out


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) values shaped to broadcast over a (K, …) tensor."""
    return values.view(-1, *[1] * (like.ndim - 1)).to(like.dtype)


# -------------------------------------------------------------------------- training step


class _Step:
    """run_trial's step for all members of one pack layout: loss, L1, clipping, SGD, metrics.

    Its SGD (`_StackedSGD`) already reads its lr from a tensor, so the step is graph-ready as it
    is: on CUDA, as `train.TrialStep`, one CUDA graph (`graphs.GraphedStep`) over static tensors
    (the (K,) lr and the sums, updated in place each epoch), the epoch's last partial batch run
    eagerly; eager elsewhere. A new layout (members joining or leaving) builds a new `_Step`, so
    the pack is captured again after the re-stack.
    """

    def __init__(
        self,
        pack: Pack,
        losses: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
        optimizer: _StackedSGD,
        l1: torch.Tensor,  # (K,)
        grad_clip: float | None,
        bf16: bool,
    ) -> None:
        self.pack, self.losses, self.optimizer = pack, losses, optimizer
        self.l1, self.use_l1, self.grad_clip, self.bf16 = l1, bool(l1.any()), grad_clip, bf16
        device = l1.device
        self.lr = torch.zeros(pack.k, device=device)
        self.sums = EpochSums.zeros(device, (pack.k,))
        self.run = GraphedStep(self.step, capture=device.type == "cuda")

    def epoch(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], lr: torch.Tensor
    ) -> EpochSums:
        self.lr.copy_(lr)
        self.sums.zero_()
        self.pack.train()
        for images, labels in batches:
            self.run(images, labels)
        return self.sums

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One wide batch (B, K·C, …) and its (K, B, 2) labels."""
        noisy, clean = labels[..., 0], labels[..., 1]  # (K, B) each
        with autocast(images, self.bf16):
            logits = self.pack(images).float()
        loss = torch.stack([fn(logits[i], noisy[i]) for i, fn in enumerate(self.losses)])
        self.optimizer.zero_grad()
        loss.sum().backward()  # members are independent: each gets its own loss's gradient
        if self.use_l1:
            self.pack.add_l1_grad_(self.l1)
        if self.grad_clip is not None:
            self.pack.clip_grad_norm_(self.grad_clip)
        self.optimizer.step(self.lr)
        self.sums.add(logits, loss, noisy, clean)


# -------------------------------------------------------------------------- optimiser, data


class _StackedSGD:
    """torch.optim.SGD (momentum, dampening 0, optional Nesterov) per member on (K, …) tensors,
    with per-member learning rates and weight decays, step for step as torch's single-tensor code.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        profile: Profile,
        weight_decay: list[float],
        buffers: list[torch.Tensor | None],
    ) -> None:
        self.params = params
        self.momentum, self.nesterov = profile.momentum, profile.nesterov
        self.weight_decay = torch.tensor(weight_decay, device=params[0].device)
        self.decay = any(weight_decay)
        self.buffers = buffers  # (K, …) per parameter; None until its first step

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


def _joined(
    loaders: list[TensorLoader], epochs: list[int], pack: Pack
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's member batches (each member's own epoch's) as one wide batch and (K, B, 2)
    labels."""
    batches = (loader.batches(e) for loader, e in zip(loaders, epochs, strict=True))
    for step in zip(*batches, strict=True):
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


def _restore(member: _Member, state: dict[str, Any], device: torch.device) -> None:
    """Load a member's checkpoint (`PackTrainer.state`) into it."""
    if state["label_hash"] != member.data.label_hash or set(state["model"]) != set(member.weights):
        raise UserError(
            "resume: the checkpoint is of another pack member (other noisy labels or model); "
            "start the trial afresh"
        )
    member.weights = {n: t.to(device, copy=True) for n, t in state["model"].items()}
    member.momentum = {n: t.to(device, copy=True) for n, t in state["momentum"].items()}
    member.history = [dict(h) for h in state["history"]]
    member.status, member.epoch = state["status"], int(state["epoch"])
