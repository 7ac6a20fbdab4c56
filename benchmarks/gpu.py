"""GPU benchmark: what one GPU gives a trial and a search. One command, under 5 minutes on one GPU.

Runs with torch, pydantic, numpy and pyyaml and the `jal_search` core alone (no Ray, Optuna or
MLflow, which the GPU machines we measure on do not have): from a source checkout,

    PYTHONPATH=. python benchmarks/gpu.py            # exits at once, saying so, without CUDA
    PYTHONPATH=. python benchmarks/gpu.py --short --device cpu   # the code path, tiny, on a CPU

Arm `step` (issue 14): for cnn_small (MNIST), cnn_cifar and resnet34_cifar (CIFAR-shaped random
images, CIFAR-10's and CIFAR-100's augmentation) at their profiles' batch sizes, in fp32 and bf16,
ms per training step of JAL-CE with the profile's L1/L2, clipping and SGD: `eager` (today's
`train.train_step` with torch's SGD on one pre-loaded batch), `graphed` (`train.TrialStep` on that
batch: the step as one CUDA graph, replayed — the floor), `our loop` (`TrialStep` fed by
`loaders.train_loader`, partial batches and augmentation included: what `run_trial` does per step);
peak GPU memory per model; `our loop / graphed floor` (target ≤ 1.25) and the issue's targets
(cnn_small ≤ 0.65 ms, cnn_cifar ≤ 2.2 ms at the faster precision).

Arm `epoch`: the embedded default (MNIST, cnn_small, batch 128, precision auto; 60% symmetric
noise) through `train.run_trial`, 3 epochs, seeds 1–3, graphed (as on CUDA) and eager (the step
as before): each epoch's seconds, training and evaluation together (target ≤ 0.35 s graphed,
after the first epoch, which captures), and whether the graphed trials' mean test accuracy lies
within the eager trials' range.

Arm `eval`: `train.confusion` over MNIST's 10k test images at the profile's eval batch size and
larger ones (evaluation is not graphed; this says whether larger batches would pay).

Arm `search` (issue 15): a TPE + ASHA search of the embedded default through a pack worker's
slot-refill loop, in one process. The trials and where ASHA stopped each are those of a real
search (`benchmarks/data/quick_search.json`, recorded from `jal-search run quick` on a CPU with
`--record EXPERIMENT`: each trial's resolved config and its epochs, in the order the searcher
suggested them). One trial at a time (`train.run_trial`, stopped at its recorded epoch) against
packs of K (`packed.PackTrainer`: K slots; a trial leaves at its recorded epoch and the next one
takes its slot at the next epoch). Packs get the stream repeated (with new seeds) to 4·K trials, so
they run full most of the time, as in a long search. Prints trials per GPU-hour per arm, their
ratio to one at a time (target ≥ 20 at the best K on one H200), peak GPU memory, and the best
val_acc among trials that ran their whole budget (the same configs and stops in every arm: it
must agree within noise).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import _common

REPO = Path(__file__).resolve().parent.parent
STREAM = REPO / "benchmarks" / "data" / "quick_search.json"


@dataclass
class Trial:
    config: Any  # TrialConfig
    stop: int  # epochs run before ASHA stopped it (its budget if it completed)


def record(experiment: Path, out: Path) -> None:
    """Write a finished experiment's trials, in suggestion order, as a stream for this arm."""
    from jal_search.experiment import read_manifest, read_trials

    settings = read_manifest(experiment)["settings"]
    stream = [
        {"setting": s["name"], "trial": t.trial_id, "config": t.resolved, "epochs": len(t.history)}
        for s in settings
        for t in read_trials(experiment, s["name"], s["failures"])
        if t.history and t.resolved
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source": experiment.name, "trials": stream}, indent=1) + "\n")
    print(f"recorded {len(stream)} trials of {experiment} in {out}")


def load(path: Path, device: str, short: bool) -> list[Trial]:
    from jal_search.config import TrialConfig

    trials = []
    for entry in json.loads(path.read_text())["trials"]:
        update: dict[str, Any] = {"device": device}
        stop = entry["epochs"]
        if short:  # the code path only: a small subset, two epochs
            update.update(train_subset=2000, epochs=2)
            stop = min(stop, 2)
        trials.append(Trial(TrialConfig(**entry["config"]).model_copy(update=update), stop))
    return trials[:4] if short else trials


def repeated(trials: list[Trial], n: int) -> list[Trial]:
    """The stream repeated to n trials, each repeat with new seeds (new runs of the same
    configs, stopped where ASHA stopped them)."""
    out = []
    for i in range(n):
        t = trials[i % len(trials)]
        shift = i // len(trials)
        out.append(
            Trial(t.config.model_copy(update={"seed": t.config.seed + 1000 * shift}), t.stop)
        )
    return out


class _Stop(Exception):
    pass


def one_at_a_time(trials: list[Trial]) -> tuple[float, float]:
    """(seconds, best val_acc of the trials that ran their budget), run_trial after run_trial."""
    from jal_search.train import run_trial

    best = 0.0
    began = time.perf_counter()
    for t in trials:
        last: dict[str, float] = {}

        def report(metrics: dict[str, float], state: Any, t: Trial = t, last: dict = last) -> None:
            last.update(metrics)
            if metrics["epoch"] >= t.stop:
                raise _Stop

        try:
            run_trial(t.config, report=report)
        except _Stop:
            pass
        if last.get("epoch", 0) >= t.config.epochs:
            best = max(best, last["val_acc"])
    return time.perf_counter() - began, best


def packed(trials: list[Trial], k: int) -> tuple[float, float]:
    """(seconds, best val_acc of the trials that ran their budget), K slots refilled in order."""
    from jal_search.packed import PackTrainer

    queue, active, best = deque(trials), {}, 0.0
    trainer = PackTrainer(trials[0].config)
    began = time.perf_counter()
    while queue or active:
        while queue and len(active) < k:
            t = queue.popleft()
            active[trainer.add(t.config)] = t
        for key, metrics in trainer.train_epoch(list(active)).items():
            t = active[key]
            if metrics["epoch"] >= t.stop or metrics["diverged"]:
                if metrics["epoch"] >= t.config.epochs:
                    best = max(best, metrics["val_acc"])
                trainer.remove(key)
                del active[key]
    return time.perf_counter() - began, best


# ------------------------------------------------------------------------- step, epoch, eval

# (profile, the target for our loop's step in ms at the faster precision; None: none)
STEP_WORKLOADS = (("mnist", 0.65), ("cifar10", 2.2), ("cifar100", None))
ARMS = ("step", "epoch", "eval", "search")


def _dataset(name: str, short: bool) -> Any:
    """MNIST (the embedded copy), or random uint8 images of CIFAR's shape with the dataset's
    classes and augmentation (the GPU machines hold no CIFAR copy; speed does not need one)."""
    import torch

    from jal_search.data import Augment, ImageSet, load_dataset

    if name == "mnist":
        return load_dataset("mnist")
    classes = 10 if name == "cifar10" else 100
    g = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (512 if short else 50_000, 3, 32, 32), dtype=torch.uint8, generator=g
    )
    labels = torch.randint(0, classes, (len(images),), generator=g)
    augment = Augment(crop_padding=4, flip=True, rotation=20.0 if name == "cifar100" else 0.0)
    return ImageSet(name, images, labels, images[:0], labels[:0], classes, (0.5,) * 3, (0.25,) * 3,
                    augment, "random uint8")  # fmt: skip


def _timed(step: Callable[[], object], steps: int, sync: Callable[[], None]) -> Callable[[], float]:
    """A callable that runs `steps` steps and returns their seconds (the device's work included)."""

    def run() -> float:
        sync()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return time.perf_counter() - began

    return run


def step_arm(name: str, target: float | None, device: Any, short: bool, repeats: int) -> None:
    """ms per step: eager, graphed floor, our loop; per precision (fp32 only on a CPU)."""
    import numpy as np
    import torch

    from jal_search.config import TrialConfig
    from jal_search.loaders import train_loader
    from jal_search.losses import build_loss
    from jal_search.models import build_model
    from jal_search.profiles import get_profile
    from jal_search.train import EpochSums, TrialStep, make_optimizer, train_step

    cuda = device.type == "cuda"
    ds = _dataset(name, short)
    cfg = TrialConfig(dataset=name, loss="jal_ce").resolve()
    profile = get_profile(name)
    batch, steps = (8, 2) if short else (cfg.batch_size, 200)
    labels = ds.train_labels
    pair = torch.stack([labels, labels], dim=1)
    loader = train_loader(ds, np.arange(len(labels)), pair, batch_size=batch, device=device, seed=0)
    one = next(iter(loader.batches(0)))
    loss_fn = build_loss(cfg.loss, ds.num_classes, **cfg.loss_params)
    sync = torch.cuda.synchronize if cuda else lambda: None

    def model_and_sgd() -> tuple[Any, Any]:
        torch.manual_seed(0)
        shape = ds.train_images.shape
        model = build_model(cfg.model, ds.num_classes, shape[1], shape[-1]).to(device)
        return model, make_optimizer(model, profile, cfg)

    def trial_step(bf16: bool) -> Any:
        model, sgd = model_and_sgd()
        sums = EpochSums.zeros(device)
        step = TrialStep(model, loss_fn, sgd, cfg.l1, profile.grad_clip, sums, bf16, device)
        step.start_epoch()
        return step

    def arms_of(bf16: bool) -> dict[str, Callable[[], object]]:
        model, sgd = model_and_sgd()
        sums = EpochSums.zeros(device)
        graphed, ours, stream = trial_step(bf16), trial_step(bf16), _common.forever(loader.batches)
        return {
            "eager": lambda: train_step(
                model, loss_fn, sgd, *one, cfg.l1, profile.grad_clip, sums, bf16
            ),
            "graphed": lambda: graphed(*one),
            "our loop": lambda: ours(*next(stream)),
        }

    best = float("inf")
    for bf16 in (False, True) if cuda else (False,):
        arms = arms_of(bf16)
        added = {}  # GPU memory each arm's model, optimiser, activations and graph hold at peak
        for arm, step in arms.items():  # warm-up, and on CUDA the graphs' capture (4th step)
            before = torch.cuda.memory_allocated() if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(5 if cuda else 1):
                step()
            added[arm] = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else math.nan
        times = _common.interleaved({a: _timed(f, steps, sync) for a, f in arms.items()}, repeats)
        ms = {arm: 1e3 * _common.median(t) / steps for arm, t in times.items()}
        precision = "bf16" if bf16 else "fp32"
        print(
            f"step {cfg.model} {precision} batch {batch}: eager {ms['eager']:.3f} ms, graphed "
            f"{ms['graphed']:.3f} ms, our loop {ms['our loop']:.3f} ms (eager / graphed "
            f"{ms['eager'] / ms['graphed']:.2f}×, eager / our loop "
            f"{ms['eager'] / ms['our loop']:.2f}×); peak GiB added: eager {added['eager']:.2f}, "
            f"graphed {added['graphed']:.2f}, our loop {added['our loop']:.2f}",
            flush=True,
        )
        name_ = f"{cfg.model} {precision} our loop / graphed floor step time"
        _common.ratio(name_, ms["our loop"] / ms["graphed"], "<=", 1.25)
        best = min(best, ms["our loop"])
    if target is not None:
        _common.ratio(f"{cfg.model} our loop step ms, faster precision", best, "<=", target)


def epoch_arm(device: Any, short: bool) -> None:
    """The embedded default's epochs through run_trial, graphed (as on CUDA) and eager, over
    seeds at GPU.md's 60% symmetric noise: epoch seconds and the final test accuracies."""
    import torch

    from jal_search import train
    from jal_search.config import TrialConfig

    cuda = device.type == "cuda"
    size = {"train_subset": 1000, "epochs": 2} if short else {"epochs": 3}
    seeds = (1,) if short else (1, 2, 3)
    after_first: dict[str, list[float]] = {"graphed": [], "eager": []}
    accuracy: dict[str, list[float]] = {"graphed": [], "eager": []}
    for seed in seeds:
        cfg = TrialConfig(dataset="mnist", noise_type="symmetric", noise_rate=0.6, seed=seed,
                          device=str(device), **size)  # fmt: skip
        for arm in after_first:
            eager = mock.patch.object(train, "use_graphs", lambda device: False)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with eager if arm == "eager" else contextlib.nullcontext():
                history = train.run_trial(cfg).history
            seconds = [m["epoch_seconds"] for m in history]
            after_first[arm] += seconds[1:]
            accuracy[arm].append(history[-1]["test_acc"])
            memory = f"; peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
            print(
                f"epoch {arm} seed {seed}: embedded default, seconds per epoch (train + eval) "
                f"{', '.join(f'{x:.3f}' for x in seconds)}; bf16 {history[0]['bf16']:.0f}; "
                f"final test_acc {history[-1]['test_acc']:.4f}{memory}",
                flush=True,
            )
    low, high = min(accuracy["eager"]), max(accuracy["eager"])
    mean = sum(accuracy["graphed"]) / len(seeds)
    print(
        f"epoch test_acc over seeds {list(seeds)}: graphed mean {mean:.4f}, eager range "
        f"[{low:.4f}, {high:.4f}]: {'within' if low <= mean <= high else 'outside'}",
        flush=True,
    )
    graphed, eager = _common.median(after_first["graphed"]), _common.median(after_first["eager"])
    _common.ratio("embedded default epoch s after the first, graphed", graphed, "<=", 0.35)
    _common.ratio("embedded default epoch time, eager / graphed", eager / graphed, ">=", 1.0)


def eval_arm(device: Any, short: bool, repeats: int) -> None:
    """train.confusion over MNIST's test set at the profile's eval batch size and larger."""
    import numpy as np
    import torch

    from jal_search.data import load_dataset
    from jal_search.loaders import eval_loader
    from jal_search.models import build_model
    from jal_search.profiles import get_profile
    from jal_search.train import check_precision, confusion

    ds = load_dataset("mnist")
    profile = get_profile("mnist")
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1, 28).to(device)
    bf16 = check_precision("auto", profile, device)
    rows = np.arange(1000) if short else None  # short: 1000 training images
    labels = ds.train_labels[:1000] if short else None
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for batch in (profile.eval_batch_size, 4 * profile.eval_batch_size, 10_000):
        loader = eval_loader(ds, rows, labels, batch_size=batch, device=device)
        confusion(model, loader, bf16)  # warm-up
        run = functools.partial(confusion, model, loader, bf16)
        times = _common.interleaved({"eval": _timed(run, 1, sync)}, repeats)
        print(f"eval cnn_small, {loader.num_samples} images, batch {batch}: "
              f"{1e3 * _common.median(times['eval']):.1f} ms", flush=True)  # fmt: skip


def _report(arm: str, trials: int, seconds: float, best: float, extra: str = "") -> None:
    rate = trials / seconds * 3600
    print(
        f"search {arm}: {trials} trials in {seconds:.1f} s = {rate:.0f} trials/h{extra}; ", end=""
    )
    print(f"best val_acc of completed trials {best:.4f}", flush=True)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for the code path")
    p.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}, comma-separated")
    p.add_argument("--packs", default="8,32,64", help="pack sizes K, comma-separated")
    p.add_argument("--stream", type=Path, default=STREAM, help="trials recorded with --record")
    p.add_argument("--record", type=Path, metavar="EXPERIMENT", help="record a stream, then exit")
    args = p.parse_args()
    if args.record:
        record(args.record, args.stream)
        return
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here, nothing measured; run it on a GPU machine")
        return
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        p.error(f"--arms: unknown {', '.join(sorted(unknown))}; choose of {', '.join(ARMS)}")
    trials = load(args.stream, args.device, args.short)
    _common.header(
        "gpu",
        args,
        device=torch.cuda.get_device_name() if cuda else "cpu (the code path only)",
        stream=f"{args.stream.name}: {len(trials)} trials",
        arms=", ".join(arms),
    )
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.short else 3)
    if "step" in arms:
        for name, target in STEP_WORKLOADS:
            step_arm(name, target, device, args.short, repeats)
    if "epoch" in arms:
        epoch_arm(device, args.short)
    if "eval" in arms:
        eval_arm(device, args.short, repeats)
    if "search" in arms:
        search_arm(trials, [2] if args.short else [int(k) for k in args.packs.split(",")], cuda)


def search_arm(trials: list[Trial], packs: list[int], cuda: bool) -> None:
    import torch

    seconds, best = one_at_a_time(trials)
    base = len(trials) / seconds * 3600
    _report("one at a time", len(trials), seconds, best)
    for k in packs:
        stream = repeated(trials, max(len(trials), 4 * k))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, best = packed(stream, k)
        memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        _report(f"pack {k}", len(stream), seconds, best, memory)
        rate = len(stream) / seconds * 3600
        _common.ratio(f"search trials per hour, pack {k} / one at a time", rate / base, ">=", 20)


if __name__ == "__main__":
    main()
