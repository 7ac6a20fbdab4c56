"""GPU benchmark: what one GPU gives a search. One command, a few minutes on one GPU.

Runs with torch, pydantic, numpy and pyyaml and the `jal_search` core alone (no Ray, Optuna or
MLflow, which the GPU machines we measure on do not have): from a source checkout,

    PYTHONPATH=. python benchmarks/gpu.py            # exits at once, saying so, without CUDA
    PYTHONPATH=. python benchmarks/gpu.py --short --device cpu   # the code path, tiny, on a CPU

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

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _report(arm: str, trials: int, seconds: float, best: float, extra: str = "") -> None:
    rate = trials / seconds * 3600
    print(
        f"search {arm}: {trials} trials in {seconds:.1f} s = {rate:.0f} trials/h{extra}; ", end=""
    )
    print(f"best val_acc of completed trials {best:.4f}", flush=True)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for the code path")
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
    packs = [2] if args.short else [int(k) for k in args.packs.split(",")]
    trials = load(args.stream, args.device, args.short)
    _common.header(
        "gpu",
        args,
        device=torch.cuda.get_device_name() if cuda else "cpu (the code path only)",
        stream=f"{args.stream.name}: {len(trials)} trials",
    )
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
