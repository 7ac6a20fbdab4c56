"""ASHA + TPE vs a full grid: epochs spent and the best validation accuracy each one finds.

The grid trains every configuration of a discrete JAL-CE space (α × β × a) at one noise setting
(symmetric 0.6) on the embedded default (MNIST, a 20k subset, its CNN) for the mnist profile's 20
epochs — the budget a real search trains, and the cosine schedule spans it, so shorter runs are not
prefixes of these curves — and records each trial's per-epoch `val_acc`. ASHA + TPE is then
replayed on those curves with as many trials as the grid has configurations, configured as
`tune_search` configures a real search: every stop decision comes from Ray's own
`ASHAScheduler` (`_scheduler`'s arguments: max_t = the epochs, one bracket, stop_last_trials); TPE
is `studies.SettingSearch`, the searcher a search builds (Optuna's TPESampler, seeded,
10 startup trials, the paper's config first when it lies on the grid, early-stopped trials told
as PRUNED, no config trained twice); trials run two at a time (quick.yaml's
max_concurrent_trials on 2 CPUs) and every epoch takes the same time, so ASHA sees results in
the order a real search delivers them and a freed slot asks TPE at once. A replayed trial costs
the epochs it ran. Flags change the schedules, seeds, concurrency, brackets, TPE's startup
trials, the paper's config going first and whether TPE may re-propose a tried config (as Ray's
own OptunaSearch lets it); replaying is cheap, so they can be explored on one grid.

"Best found" is the highest last-epoch val_acc among trials that reached the maximum epochs (the
rule `results.best` applies). Target: within 0.5 point of the grid's best with ≤ 25% of its
epochs; the script prints, per (grace period, reduction factor), the median over TPE seeds.
Findings (48 configs × 20 epochs, 10 seeds; benchmarks/README.md has the table): the landscape
is flat (13 of 48 configs end within 0.25 point of the best; val_acc is scored on noisy labels),
so every schedule finds the best within 0.05 point, and what separates schedules is epochs.
Grace 1 beats grace 2 and 3 everywhere, and rf 6 (rungs at epochs 1 and 6) is cheapest: 0.132
of the grid's epochs (10 of 10 seeds meet the target). With repeats (`--with-repeats`) TPE
spends 0.255 (5 of 10 seeds): it keeps proposing the best few configs, and each repeat clears
every rung. Random sampling (`--startup 48`: TPE's startup trials are random) spends 0.134.
Startup 5 or 20, concurrency 1, 2 brackets (tried on a 24-config sub-grid) and
stop_last_trials=False (same decisions) do not help.

`--noise`, `--epochs` and `--trials` shape the grid and the replays like another search (the
quick search: 8 epochs, 12 trials; its curves at three noise settings are kept in
benchmarks/data/grid8_*.json). `--compare` replays every rule on the same TPE seeds — none,
Ray's ASHA, Optuna's successive halving, ASHA that waits for `--least` values at a rung, and
paused halving (a trial waits at a rung until the whole rung decides it; `SettingSearch` parks
and hands it out again, as in a search) — and prints epochs per search, the mean best, and how
often each found as good a best as `none`. Findings (benchmarks/README.md, "Which rule stops
trials"): Optuna's rule trains 16–18% fewer epochs than ASHA for the same best at all three
settings, and paused halving a further 26–34% fewer: it is quick's rule.

    .venv/bin/python benchmarks/asha_efficiency.py --short   # digits, tiny grid, seconds
    .venv/bin/python benchmarks/asha_efficiency.py --curves grid20.json
        # MNIST 20k, 48 configs × 20 epochs: ~1 h on 2 shared CPUs, then a minute of replays;
        # the curves are kept in grid20.json (and grid20.json.partial while training)
    .venv/bin/python benchmarks/asha_efficiency.py --curves grid20.json --with-repeats
        # replays only (a minute): here TPE as Ray's own OptunaSearch runs it
    .venv/bin/python benchmarks/asha_efficiency.py --curves grid20.json --rule successive_halving
        # replays only: Optuna's promotion rule (spec scheduler.type: successive_halving)
    .venv/bin/python benchmarks/asha_efficiency.py --noise asymmetric:0.4 --trials 12 \
        --curves benchmarks/data/grid8_asymmetric0.4.json --seeds 50 --schedules 1:6 --compare
        # every rule on the quick search's shape (the curves' epochs: 8), seconds
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import _common

PAPER = {"alpha": 1.0, "beta": 1.0, "a": 30.0}  # the paper's CIFAR-10 JAL-CE config
# The shipped (grace period, reduction factor): spec.Scheduler's default and quick.yaml's, chosen
# from this benchmark (the findings above).
SHIPPED = (1, 6.0)


@dataclass(frozen=True)
class Setup:
    base: dict
    grid: dict[str, list[float]]
    max_epochs: int
    schedules: list[tuple[int, float]]  # (grace period, reduction factor)
    seeds: int
    trials: int | None = None  # trials per replayed search (None: as many as the grid's configs)


SHORT = Setup(
    base={"dataset": "digits", "noise_type": "symmetric", "noise_rate": 0.6, "loss": "jal_ce"},
    grid={"alpha": [1.0, 10.0], "beta": [0.1, 1.0], "a": [5.0, 30.0]},
    max_epochs=4,
    schedules=[(1, 2), (1, 3), (1, 6), (2, 2)],
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
    max_epochs=20,  # the mnist profile's epochs: what a real search trains
    schedules=[(g, r) for g in (1, 2, 3) for r in (2, 3, 4, 6, 8)],
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


def run_grid(
    setup: Setup, workers: int, pack: int, save: Path | None = None
) -> dict[tuple, list[float]]:
    """Every grid point to max epochs; packs of `pack` points spread over `workers` processes.

    With `save`, the curves are written there at the end, and those of the packs done so far to
    `save` + ".partial" after each pack (to watch a long run)."""
    points = grid_points(setup.grid)
    packs = [points[i : i + pack] for i in range(0, len(points), pack)]
    curves: dict[tuple, list[float]] = {}
    began = time.perf_counter()

    def done(ps: list[dict], cs: list[list[float]]) -> None:
        curves.update({tuple(p.values()): c for p, c in zip(ps, cs, strict=True)})
        print(f"grid: {len(curves)}/{len(points)} configs in {time.perf_counter() - began:.0f} s")
        if save:
            partial = save.with_name(save.name + ".partial")
            partial.write_text(dump(setup.base, curves))

    if workers == 1:
        for ps in packs:
            done(ps, train_pack(setup.base, ps, setup.max_epochs))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(train_pack, setup.base, ps, setup.max_epochs): ps for ps in packs
            }
            for future in as_completed(futures):
                done(futures[future], future.result())
    if save:
        save.write_text(dump(setup.base, curves))
        save.with_name(save.name + ".partial").unlink(missing_ok=True)
    return curves


def dump(setting: dict, curves: dict[tuple, list[float]]) -> str:
    """The curves as JSON, with the setting they were trained at (read_curves checks it)."""
    rows = [{"point": list(k), "val_acc": v} for k, v in curves.items()]
    return json.dumps({"setting": setting, "curves": rows})


@dataclass(frozen=True)
class Replay:
    epochs: int
    best: float  # best last-epoch val_acc among trials that reached max epochs (-inf: none did)


@dataclass(frozen=True)
class Options:
    """How the replayed search is configured beyond the schedule (defaults: as `tune_search`)."""

    concurrency: int = 2  # max_concurrent_trials; quick.yaml runs 2 trials on 2 CPUs
    brackets: int = 1  # ASHAScheduler(brackets=...)
    stop_last_trials: bool = True  # ASHAScheduler(stop_last_trials=...)
    startup: int = 10  # TPESampler(n_startup_trials=...); 10 is Optuna's default, what Ray builds
    paper_first: bool = True  # the paper's config as the first trial when it lies on the grid
    # or successive_halving (Optuna's rule), paused_halving (studies.PausedHalving), asha_after
    rule: str = "asha"
    least: int = 3  # asha_after: values a rung must hold before it stops a trial
    with_repeats: bool = False  # let TPE re-propose tried configs, as Ray's own OptunaSearch does


def replay(
    curves: dict[tuple, list[float]],
    setup: Setup,
    grace: int,
    rf: float,
    seed: int,
    options: Options = Options(),  # noqa: B008 (frozen)
) -> Replay:
    """ASHA + TPE over the grid's choices, with as many trials as the grid has points.

    Trials run `options.concurrency` at a time and every epoch takes the same time (one
    architecture, one thread each), so results arrive in the order a real search delivers them:
    by time, ties by start order. A freed slot asks TPE for the next trial at once; TPE ignores
    running trials (Optuna's default, no constant liar), as in Ray's OptunaSearch.
    """
    import heapq
    import tempfile

    import numpy as np
    import optuna
    from optuna.distributions import CategoricalDistribution
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from jal_search.spec import Scheduler
    from jal_search.studies import SettingSearch
    from jal_search.tune_search import SuccessiveHalvingScheduler

    class WithRepeats(SettingSearch):  # TPE may propose a tried config again (Ray's OptunaSearch)
        def _ask(self) -> optuna.Trial:
            return self.study.ask(self.space)

    np.random.seed(seed)  # ASHA draws each trial's bracket from NumPy's global generator
    keys = list(setup.grid)
    paper = options.paper_first and all(PAPER[k] in setup.grid[k] for k in keys)
    folder = Path(tempfile.mkdtemp(prefix="jal-replay-"))  # the study's file, as in a search
    trials = setup.trials or len(curves)
    searcher = (WithRepeats if options.with_repeats else SettingSearch)(
        folder,
        trials,
        setup.max_epochs,
        seed,
        space={k: CategoricalDistribution(v) for k, v in setup.grid.items()},
        first=[{k: PAPER[k] for k in keys}] if paper else [],
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=options.startup),
        halving=(grace, rf) if options.rule == "paused_halving" else None,
    )
    scheduler = (
        SuccessiveHalvingScheduler(grace, rf)
        if options.rule == "successive_halving"
        else FIFOScheduler()
        if options.rule in ("none", "paused_halving")
        else AshaAfter(
            Scheduler(grace_period=grace, reduction_factor=rf).rungs(setup.max_epochs),
            rf,
            options.least,
        )
        if options.rule == "asha_after"
        else ASHAScheduler(  # as tune_search._scheduler builds it
            time_attr="epoch",
            metric="val_acc",
            mode="max",
            max_t=setup.max_epochs,
            grace_period=grace,
            reduction_factor=rf,
            brackets=options.brackets,
            stop_last_trials=options.stop_last_trials,
        )
    )
    queue: list[tuple[int, int, int]] = []  # (time of the next result, trial number, its epoch)
    running: dict[int, tuple[SimpleNamespace, list[float]]] = {}
    reached: dict[int, int] = {}  # trial → its last epoch (a paused one goes on from there)

    def start(now: int) -> bool:
        chosen = searcher.next()  # a paused trial let go on, else a new one
        if chosen is None:
            return False
        number, config = chosen
        tune_trial = SimpleNamespace(trial_id=str(number))
        if number not in reached:
            scheduler.on_trial_add(None, tune_trial)
        running[number] = (tune_trial, curves[tuple(config[k] for k in keys)])
        heapq.heappush(queue, (now + 1, number, reached.get(number, 0) + 1))
        return True

    spent, finished = 0, []
    while len(running) < options.concurrency and start(0):
        pass
    while queue:
        now, n, epoch = heapq.heappop(queue)
        tune_trial, curve = running[n]
        value = curve[epoch - 1]
        result = {"epoch": epoch, "val_acc": value, "diverged": 0.0}
        searcher.report(n, epoch, value)
        spent += 1
        reached[n] = epoch
        stop = searcher.judge(n, epoch, value) != "go"  # paused halving's verdict
        stop = stop or scheduler.on_trial_result(None, tune_trial, result) == "STOP"
        if epoch < setup.max_epochs and not stop:
            heapq.heappush(queue, (now + 1, n, epoch + 1))
            continue
        del running[n]
        scheduler.on_trial_complete(None, tune_trial, result)
        searcher.tell(n, result)  # stopped early: told as PRUNED; paused: waits
        if epoch >= setup.max_epochs:
            finished.append(value)
        while len(running) < options.concurrency and start(now):
            pass
    shutil.rmtree(folder)
    return Replay(spent, max(finished, default=-math.inf))


class AshaAfter:
    """ASHA's rule as Ray applies it — a trial reaching a rung stops when its value is below the
    (1 − 1/rf) percentile of the values recorded there before it — except that a rung stops no
    trial until it holds `least` values: early rungs judge on more than one or two rivals."""

    def __init__(self, rungs: list[int], rf: float, least: int) -> None:
        self.rf, self.least = rf, least
        self.recorded: dict[int, list[float]] = {epoch: [] for epoch in rungs}

    def on_trial_add(self, _controller: object, _trial: object) -> None:
        pass

    def on_trial_complete(self, _controller: object, _trial: object, _result: dict) -> None:
        pass

    def on_trial_result(self, _controller: object, _trial: object, result: dict) -> str:
        import numpy as np

        before = self.recorded.get(result["epoch"])
        if before is None:
            return "CONTINUE"
        cutoff = np.percentile(before, 100 * (1 - 1 / self.rf)) if len(before) >= self.least else 0
        before.append(result["val_acc"])
        return "STOP" if result["val_acc"] < cutoff else "CONTINUE"


def schedule_list(text: str) -> list[tuple[int, float]]:
    """ "1:4,2:3" -> [(1, 4.0), (2, 3.0)]: (grace period, reduction factor) pairs."""
    return [(int(g), float(r)) for g, r in (item.split(":") for item in text.split(","))]


def noise_setting(text: str) -> dict[str, object]:
    """ "asymmetric:0.4" -> the trial config's noise fields."""
    kind, rate = text.split(":")
    return {"noise_type": kind, "noise_rate": float(rate)}


def read_curves(path: Path, setup: Setup) -> tuple[dict[tuple, list[float]], Setup]:
    """The curves in `path` and `setup` narrowed to them (a sub-grid of `setup.grid` is fine)."""
    saved = json.loads(path.read_text())
    curves = {tuple(c["point"]): c["val_acc"] for c in saved["curves"]}
    grid = {k: sorted({point[i] for point in curves}) for i, k in enumerate(setup.grid)}
    epochs = {len(c) for c in curves.values()}
    if len(grid_points(grid)) != len(curves) or len(epochs) != 1:
        raise SystemExit(f"{path}: not a full grid of equally long curves")
    if saved["setting"] != setup.base:
        raise SystemExit(f"{path}: curves of {saved['setting']}, not of {setup.base} (--noise)")
    return curves, replace(setup, grid=grid, max_epochs=epochs.pop())


RULES = ("none", "asha", "successive_halving", "asha_after", "paused_halving")


def compare(curves: dict, setup: Setup, options: Options, grid_best: float) -> None:
    """Every rule on the same TPE seeds: epochs per search, best found, and against `none`
    (every trial its full budget) on the same seed, how often the rule found as good a best."""
    print(f"\n{'grace':>5} {'rf':>3} {'rule':<18} {'epochs':>7} {'best':>7} {'gap':>6} >=none")
    for grace, rf in setup.schedules:
        runs = {
            rule: [
                replay(curves, setup, grace, rf, seed, replace(options, rule=rule))
                for seed in range(setup.seeds)
            ]
            for rule in RULES
        }
        for rule, rs in runs.items():
            kept = sum(r.best >= n.best for r, n in zip(rs, runs["none"], strict=True))
            print(
                f"{grace:>5} {rf:>3g} {rule:<18} {statistics.mean(r.epochs for r in rs):>7.1f} "
                f"{statistics.mean(r.best for r in rs):>7.4f} "
                f"{100 * (grid_best - statistics.median(r.best for r in rs)):>6.2f} "
                f"{kept}/{len(rs)}"
            )


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--workers", type=int, default=None, help="grid processes (default: CPUs)")
    p.add_argument("--pack", type=int, default=4, help="grid points trained per pack")
    p.add_argument("--curves", type=Path, help="JSON of the grid's curves: read if it exists")
    p.add_argument("--schedules", type=schedule_list, help='grace:rf pairs, e.g. "1:4,2:3"')
    p.add_argument("--seeds", type=int, help="TPE seeds per schedule")
    p.add_argument("--noise", type=noise_setting, help='the grid\'s noise, e.g. "asymmetric:0.4"')
    p.add_argument("--epochs", type=int, help="each config's epochs (quick.yaml: 8)")
    p.add_argument("--trials", type=int, help="trials per replayed search (quick.yaml: 12)")
    p.add_argument("--concurrency", type=int, default=Options.concurrency, help="trials at once")
    p.add_argument("--brackets", type=int, default=Options.brackets, help="ASHA brackets")
    p.add_argument("--startup", type=int, default=Options.startup, help="TPE's n_startup_trials")
    p.add_argument(
        "--no-paper-first", action="store_true", help="don't start from the paper's config"
    )
    p.add_argument(
        "--with-repeats", action="store_true", help="let TPE re-propose tried configs (Ray's own)"
    )
    p.add_argument(
        "--rule",
        choices=RULES,
        default=Options.rule,
        help="who stops trials: Ray's ASHA, Optuna's successive-halving rule, paused halving "
        "(studies.PausedHalving), or ASHA that stops nothing at a rung until it holds --least "
        "values",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help=f"replay every rule ({', '.join(RULES)}) per schedule",
    )
    p.add_argument(
        "--least", type=int, default=Options.least, help="asha_after: values before a stop"
    )
    args = p.parse_args()
    setup = SHORT if args.short else FULL
    setup = replace(
        setup,
        base={**setup.base, **(args.noise or {})},
        max_epochs=args.epochs or setup.max_epochs,
        schedules=args.schedules or setup.schedules,
        seeds=args.seeds or setup.seeds,
        trials=args.trials,
    )
    options = Options(
        concurrency=args.concurrency,
        brackets=args.brackets,
        startup=args.startup,
        paper_first=not args.no_paper_first,
        rule=args.rule,
        least=args.least,
        with_repeats=args.with_repeats,
    )
    workers = 1 if args.short else args.workers or os.cpu_count() or 1
    began = time.perf_counter()
    if args.curves and args.curves.is_file():
        curves, setup = read_curves(args.curves, setup)
        source = f"read from {args.curves}"
    else:
        source = f"trained by {workers} processes, packs of {args.pack}, 1 thread each"
    points = len(grid_points(setup.grid))
    _common.header(
        "asha_efficiency",
        args,
        setting=setup.base,
        grid=f"{setup.grid} = {points} configs × {setup.max_epochs} epochs",
        grid_curves=source,
        replay=f"{options}, {setup.trials or points} trials, {setup.seeds} TPE seeds",
    )
    if not (args.curves and args.curves.is_file()):
        curves = run_grid(setup, workers, args.pack, args.curves)
        print(f"grid: trained in {time.perf_counter() - began:.0f} s wall")
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

    if args.compare:
        compare(curves, setup, options, grid_best[-1])
        return
    print(f"\n{'grace':>5} {'rf':>3} {'epochs/grid':>11} {'gap (points)':>12}  seeds meeting both")
    rows = {}
    for grace, rf in setup.schedules:
        if grace > setup.max_epochs:
            continue
        runs = [replay(curves, setup, grace, rf, seed, options) for seed in range(setup.seeds)]
        fraction = [r.epochs / grid_epochs for r in runs]
        gap = [100 * (grid_best[-1] - r.best) for r in runs]  # inf when no trial finished
        meets = sum(f <= 0.25 and g <= 0.5 for f, g in zip(fraction, gap, strict=True))
        rows[grace, rf] = (statistics.median(fraction), statistics.median(gap))
        print(
            f"{grace:>5} {rf:>3g} {rows[grace, rf][0]:>11.3f} {rows[grace, rf][1]:>12.2f} "
            f"  {meets}/{setup.seeds}"
        )
    print()
    chosen = [SHIPPED] if SHIPPED in rows else []
    both = [k for k, (f, g) in rows.items() if f <= 0.25 and g <= 0.5]
    chosen += [min(both, key=lambda k: rows[k][0])] if both else []
    for grace, rf in dict.fromkeys(chosen):
        fraction, gap = rows[grace, rf]
        name = f"{options.rule} grace={grace} rf={rf:g}"
        _common.ratio(f"{name} epochs / grid epochs", fraction, "<=", 0.25)
        _common.ratio(f"{name} best val_acc gap (points)", gap, "<=", 0.5)
    if not both:
        print("no (grace period, reduction factor) met both targets at the median seed")
    else:
        print(f"meeting both targets (median seed): {sorted(both)}")


if __name__ == "__main__":
    main()
