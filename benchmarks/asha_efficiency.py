"""ASHA + TPE vs a full grid: epochs spent and the best validation accuracy each one finds.

The grid trains every configuration of a discrete JAL-CE space (α × β × a) to the maximum epochs
at one noise setting (symmetric 0.6) on the embedded default (MNIST, a 20k subset, its CNN) and
records each trial's per-epoch `val_acc`. ASHA + TPE is then replayed on those recorded curves with
the same number of trials as the grid has configurations: TPE is Optuna's TPESampler as Ray's
OptunaSearch builds it (seeded; the paper's config first when it lies on the grid; early-stopped
trials told as PRUNED, as `tune_adapter.PruningAwareOptunaSearch` does), and every stop decision
comes from Ray's own ASHA bookkeeping (`ray.tune.schedulers.async_hyperband._Bracket`). A replayed
trial costs the epochs it ran before ASHA stopped it. Replaying is exact for one trial at a time
(concurrency 1; with concurrent trials ASHA sees results in another order) and makes it cheap to
try many grace periods, reduction factors and TPE seeds on one grid.

"Best found" is the highest last-epoch val_acc among trials that reached the maximum epochs (the
rule `results.best` applies). Target: within 0.5 point of the grid's best with ≤ 25% of its
epochs; the script prints, per (grace period, reduction factor), the median over TPE seeds.

    .venv/bin/python benchmarks/asha_efficiency.py --short   # digits, tiny grid, seconds
    .venv/bin/python benchmarks/asha_efficiency.py           # MNIST 20k, 48 configs × 8 epochs:
                                                             # ~15 min on 2 CPUs
    ... --curves grid.json   # keep the grid's curves there; a later run replays them untrained
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import _common

PAPER = {"alpha": 1.0, "beta": 1.0, "a": 30.0}  # the paper's CIFAR-10 JAL-CE config


@dataclass(frozen=True)
class Setup:
    base: dict
    grid: dict[str, list[float]]
    max_epochs: int
    schedules: list[tuple[int, float]]  # (grace period, reduction factor)
    seeds: int


SHORT = Setup(
    base={"dataset": "digits", "noise_type": "symmetric", "noise_rate": 0.6, "loss": "jal_ce"},
    grid={"alpha": [1.0, 10.0], "beta": [0.1, 1.0], "a": [5.0, 30.0]},
    max_epochs=4,
    schedules=[(1, 2), (1, 3), (2, 2)],
    seeds=3,
)
FULL = Setup(
    base={
        "dataset": "mnist",
        "train_subset": 20000,
        "noise_type": "symmetric",
        "noise_rate": 0.6,
        "loss": "jal_ce",
    },
    grid={"alpha": [0.3, 1.0, 3.0, 10.0], "beta": [0.1, 0.3, 1.0, 3.0], "a": [5.0, 15.0, 30.0]},
    max_epochs=8,
    schedules=[(g, r) for g in (1, 2, 3) for r in (2, 3, 4)] + [(1, 6), (1, 8)],
    seeds=10,
)


def grid_points(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def train_pack(base: dict, points: list[dict], epochs: int) -> list[list[float]]:
    """Per-epoch val_acc of each point, trained as one pack (one process, one thread)."""
    from jal_search.config import TrialConfig
    from jal_search.packed import run_packed

    configs = [
        TrialConfig(**base, loss_params=p, epochs=epochs, threads=1, device="cpu") for p in points
    ]
    return [[m["val_acc"] for m in r.history] for r in run_packed(configs)]


def run_grid(setup: Setup, workers: int, pack: int) -> dict[tuple, list[float]]:
    """Every grid point to max epochs; packs of `pack` points spread over `workers` processes."""
    points = grid_points(setup.grid)
    packs = [points[i : i + pack] for i in range(0, len(points), pack)]
    jobs = [(setup.base, p, setup.max_epochs) for p in packs]
    if workers == 1:
        curves = [train_pack(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            curves = list(pool.map(train_pack, *zip(*jobs, strict=True)))
    return {
        tuple(p.values()): c
        for ps, cs in zip(packs, curves, strict=True)
        for p, c in zip(ps, cs, strict=True)
    }


@dataclass(frozen=True)
class Replay:
    epochs: int
    best: float  # best last-epoch val_acc among trials that reached max epochs (nan: none did)


def replay(curves: dict[tuple, list[float]], setup: Setup, grace: int, rf: float, seed: int):
    """ASHA + TPE over the grid's choices, with as many trials as the grid has points."""
    import optuna
    from ray.tune.schedulers.async_hyperband import _Bracket

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keys = list(setup.grid)
    space = {k: optuna.distributions.CategoricalDistribution(v) for k, v in setup.grid.items()}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    if all(PAPER[k] in setup.grid[k] for k in keys):
        study.enqueue_trial({k: PAPER[k] for k in keys})
    bracket = _Bracket(grace, setup.max_epochs, rf, 0)  # what ASHAScheduler(brackets=1) builds
    spent, finished = 0, []
    for n in range(len(curves)):
        trial = study.ask(space)
        curve = curves[tuple(trial.params[k] for k in keys)]
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
            stop = bracket.on_result(SimpleNamespace(trial_id=n), epoch, value) == "STOP"
            if epoch >= setup.max_epochs:
                study.tell(trial, value)
                finished.append(value)
                break
            if stop:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        spent += epoch
    return Replay(spent, max(finished, default=float("nan")))


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--workers", type=int, default=None, help="grid processes (default: CPUs)")
    p.add_argument("--pack", type=int, default=4, help="grid points trained per pack")
    p.add_argument("--curves", type=Path, help="JSON of the grid's curves: read if it exists")
    args = p.parse_args()
    setup = SHORT if args.short else FULL
    workers = 1 if args.short else args.workers or os.cpu_count() or 1
    points = len(grid_points(setup.grid))
    _common.header(
        "asha_efficiency",
        args,
        setting=setup.base,
        grid=f"{setup.grid} = {points} configs × {setup.max_epochs} epochs",
        tpe_seeds=setup.seeds,
        grid_training=f"{workers} processes, packs of {args.pack}, 1 thread each",
    )
    began = time.perf_counter()
    if args.curves and args.curves.is_file():
        curves = {tuple(c["point"]): c["val_acc"] for c in json.loads(args.curves.read_text())}
        print(f"grid: curves read from {args.curves}")
    else:
        curves = run_grid(setup, workers, args.pack)
        print(f"grid: trained in {time.perf_counter() - began:.0f} s wall")
        if args.curves:
            rows = [{"point": list(k), "val_acc": v} for k, v in curves.items()]
            args.curves.write_text(json.dumps(rows))
    grid_epochs = points * setup.max_epochs
    best_point, grid_best = max(curves.items(), key=lambda kv: kv[1][-1])
    print(f"grid: {points} configs × {setup.max_epochs} epochs = {grid_epochs} epochs")
    print(
        f"grid best val_acc {grid_best[-1]:.4f} at {dict(zip(setup.grid, best_point, strict=True))}"
    )
    print(
        f"grid mean/worst last val_acc {statistics.mean(c[-1] for c in curves.values()):.4f} / "
        f"{min(c[-1] for c in curves.values()):.4f}"
    )

    print(f"\n{'grace':>5} {'rf':>3} {'epochs/grid':>11} {'gap (points)':>12}  seeds meeting both")
    rows = {}
    for grace, rf in setup.schedules:
        runs = [replay(curves, setup, grace, rf, seed) for seed in range(setup.seeds)]
        fraction = [r.epochs / grid_epochs for r in runs]
        gap = [100 * (grid_best[-1] - r.best) for r in runs]
        meets = sum(f <= 0.25 and g <= 0.5 for f, g in zip(fraction, gap, strict=True))
        rows[grace, rf] = (statistics.median(fraction), statistics.median(gap))
        print(
            f"{grace:>5} {rf:>3g} {rows[grace, rf][0]:>11.3f} {rows[grace, rf][1]:>12.2f} "
            f"  {meets}/{setup.seeds}"
        )
    print()
    shipped = (2, 2)  # search_spaces/quick.yaml
    chosen = [shipped] if shipped in rows else []
    both = [k for k, (f, g) in rows.items() if f <= 0.25 and g <= 0.5]
    chosen += [min(both, key=lambda k: rows[k][0])] if both else []
    for grace, rf in dict.fromkeys(chosen):
        fraction, gap = rows[grace, rf]
        _common.ratio(f"asha grace={grace} rf={rf:g} epochs / grid epochs", fraction, "<=", 0.25)
        _common.ratio(f"asha grace={grace} rf={rf:g} best val_acc gap (points)", gap, "<=", 0.5)
    if not both:
        print("no (grace period, reduction factor) met both targets at the median seed")
    else:
        print(f"meeting both targets (median seed): {sorted(both)}")


if __name__ == "__main__":
    main()
