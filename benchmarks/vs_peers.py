"""jal-search vs its peers: the same search by jal-search, stock Ray Tune by hand, plain Optuna.

One workload, three ways, each a process of its own timed whole (start-up, imports, Ray, teardown):
a shipped spec's dataset, loss, noise settings, trials per setting and epochs; TPE seeded with the
searcher seed, the paper's config first (the plans' `points_to_evaluate`); successive halving with
the spec's grace period and reduction factor; `max_concurrent_trials` at a time; one torch thread
per trial; and the same loop, `train.run_trial` on `SettingPlan.trial(params)`, in every arm:

- jal-search: `jal-search run SPEC --num-cpus N --storage-path TMP` (journals, checkpoints,
  MLflow on SQLite, as shipped: quick runs its trials in the driver, `executor: local`); epochs
  and best read from the experiment. Arm `jal-search ray`: the same under Ray Tune
  (`executor: ray`); `jal-search asha`: under Ray with `scheduler.type: asha` (Ray's ASHA)
  instead of the shipped rule; `jal-search pack 2`: under Ray in pack workers of 2 slots.
- stock Tune, as a user writes it (`tune_arm`): per noise setting a `tune.Tuner` with
  `OptunaSearch` (seeded TPE), `ASHAScheduler` and `MLflowLoggerCallback` (SQLite, MLflow's own
  default store), Tune's defaults otherwise (a new actor per trial); no checkpoints.
- plain Optuna (`optuna_arm`): per noise setting a study with `TPESampler` (seeded as
  jal-search seeds a study; but with n_jobs > 1 Optuna reseeds its sampler at random for every
  trial, so its draws are neither reproducible nor jal-search's: the two draw from the same
  distributions) and `SuccessiveHalvingPruner(grace, rf)`, `optimize(n_jobs=max_concurrent_trials)`
  in threads of one process; no Ray, no tracking, no checkpoints.

Per arm: wall of the whole command, epochs trained, wall per epoch and the best val_acc per noise
setting (every trial's last epoch, stopped ones included, as `results.best` scores them). Arms run
interleaved over searcher seeds (seed s: every arm once, in an order rotated by s). Ratios: Σ wall
of each jal-search arm / Σ wall of each peer over the same seeds. Target (issue 17): ≤ 1.0
against plain Optuna, with the same best val_acc within noise.

    .venv/bin/python benchmarks/vs_peers.py --short   # smoke spec, 1 seed, ~2 min
    .venv/bin/python benchmarks/vs_peers.py           # quick spec, 3 seeds, ~25 min
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import yaml

# jal-search's arms: the spec as shipped (quick: trials in the driver, Optuna's promotion rule);
# under Ray Tune; under Ray with Ray's ASHA instead; and under Ray in pack workers of 2 slots (a
# worker per CPU, so `max_concurrent_trials` off).
VARIANTS: dict[str, dict] = {
    "jal-search": {},
    "jal-search ray": {"executor": "ray"},
    "jal-search asha": {"executor": "ray", "scheduler": {"type": "asha"}},
    "jal-search pack 2": {"executor": "ray", "pack": 2},
}
ARMS = (*VARIANTS, "stock Tune", "plain Optuna")
PEERS = {"stock Tune": "tune_arm", "plain Optuna": "optuna_arm"}  # run as `python -c`


def tune_arm(spec_file: str, out: str, cpus: int) -> None:
    """Stock Ray Tune: one Tuner per noise setting, written as the Tune and Optuna docs show."""
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from jal_search.spec import load_spec, plan, trials_per_setting
    from jal_search.train import run_trial

    spec = load_spec(spec_file)
    folder = Path(out).parent
    ray.init(address="local", num_cpus=cpus)  # a bare ray.init() may attach to a stale cluster
    found = {}
    for p in plan(spec):

        def trainable(config, p=p):
            run_trial(p.trial(config), lambda metrics, state: tune.report(metrics))

        space = {}
        for k, v in p.space.items():
            if v.loguniform:
                space[k] = tune.loguniform(*v.loguniform)
            else:
                space[k] = tune.uniform(*v.uniform) if v.uniform else tune.choice(v.choice)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_acc",
                mode="max",
                search_alg=OptunaSearch(
                    points_to_evaluate=p.points_to_evaluate, seed=spec.searcher.seed
                ),
                scheduler=ASHAScheduler(
                    max_t=spec.budget.epochs,
                    grace_period=spec.scheduler.grace_period,
                    reduction_factor=spec.scheduler.reduction_factor,
                ),
                num_samples=trials_per_setting(spec, p.space),
                max_concurrent_trials=spec.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=p.name,
                storage_path=str(folder / "tune"),
                callbacks=[
                    MLflowLoggerCallback(f"sqlite:///{folder}/mlflow.db", experiment_name=p.name)
                ],
            ),
        )
        last = [r.metrics or {} for r in tuner.fit()]
        found[p.name] = (
            sum(m.get("training_iteration", 0) for m in last),
            [m.get("val_acc", math.nan) for m in last],
        )
    ray.shutdown()
    Path(out).write_text(json.dumps(found))


def optuna_arm(spec_file: str, out: str, cpus: int) -> None:
    """Plain Optuna: one study per noise setting, its trials in threads of this process."""
    import optuna

    from jal_search.spec import load_spec, plan, trials_per_setting
    from jal_search.train import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(spec_file)
    found = {}
    for p in plan(spec):

        def objective(trial, p=p):
            params = {
                k: trial.suggest_float(k, *(v.loguniform or v.uniform), log=bool(v.loguniform))
                if v.choice is None
                else trial.suggest_categorical(k, v.choice)
                for k, v in p.space.items()
            }

            def report(metrics, state):
                trial.report(metrics["val_acc"], int(metrics["epoch"]))
                if trial.should_prune():
                    raise optuna.TrialPruned

            return run_trial(p.trial(params), report).history[-1]["val_acc"]

        study = optuna.create_study(
            direction="maximize",
            # seeded as jal-search seeds a new study (studies.SettingSearch); n_jobs > 1 reseeds it
            sampler=optuna.samplers.TPESampler(seed=hash((spec.searcher.seed, 0)) % 2**32),
            pruner=optuna.pruners.SuccessiveHalvingPruner(
                min_resource=spec.scheduler.grace_period,
                reduction_factor=round(spec.scheduler.reduction_factor),
            ),
        )
        for point in p.points_to_evaluate:
            study.enqueue_trial(point)
        study.optimize(
            objective,
            n_trials=trials_per_setting(spec, p.space),
            n_jobs=spec.max_concurrent_trials or cpus,
        )
        curves = [t.intermediate_values for t in study.trials]
        found[p.name] = (sum(map(len, curves)), [c[max(c)] for c in curves if c])
    Path(out).write_text(json.dumps(found))


def run_arm(arm: str, spec_file: Path, folder: Path, cpus: int) -> dict:
    """One search as its own process: wall seconds, epochs trained, best val_acc per setting."""
    folder.mkdir()
    out = folder / "found.json"
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(_common.REPO), str(here), os.environ.get("PYTHONPATH", "")])
    if arm in VARIANTS:
        command = [Path(sys.executable).with_name("jal-search"), "run", spec_file]
        command += ["--num-cpus", str(cpus), "--storage-path", folder]
    else:
        call = f"{PEERS[arm]}({str(spec_file)!r}, {str(out)!r}, {cpus})"
        command = [sys.executable, "-c", f"import vs_peers; vs_peers.{call}"]
    began = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        done = subprocess.run(
            command, cwd=folder, env={**os.environ, "PYTHONPATH": path}, stdout=log, stderr=log
        )
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{arm} failed ({done.returncode}):\n{(folder / 'log.txt').read_text()[-3000:]}")
    if arm in VARIANTS:
        found = experiment_found(folder / yaml.safe_load(spec_file.read_text())["name"])
    else:
        found = json.loads(out.read_text())
    epochs = sum(n for n, _ in found.values())
    best = {s: max(v for v in last if math.isfinite(v)) for s, (_, last) in found.items()}
    return {"wall": wall, "epochs": epochs, "best": best}


def experiment_found(path: Path) -> dict:
    """Per setting: epochs trained and the val_acc `results.best` selects on."""
    from jal_search import results
    from jal_search.experiment import read_manifest, read_trials

    best = results.best(path, scope="last")
    found = {}
    for s in read_manifest(path)["settings"]:
        trials = read_trials(path, s["name"], s["failures"])
        found[s["name"]] = (sum(len(t.history) for t in trials), [best[s["name"]].val_acc])
    return found


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--arms", default=",".join(ARMS), help=f"a comma-separated subset of {ARMS}")
    args = p.parse_args()
    arms = tuple(a for a in ARMS if a in args.arms.split(","))
    from jal_search.spec import load_spec

    name = "smoke" if args.short else "quick"
    seeds = list(range(args.repeats or (1 if args.short else 3)))
    cpus = os.cpu_count() or 1
    spec = load_spec(name)
    _common.header(
        "vs_peers",
        args,
        spec=f"{name}: {spec.description}",
        arms=", ".join(arms),
        seeds=seeds,
        cpus=cpus,
        note="each arm is one process, timed whole; trials use one torch thread each",
    )
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="jal-vs-peers-") as tmp:
        for seed in seeds:
            raw = spec.model_dump(mode="json", exclude_none=True)
            raw["searcher"]["seed"] = seed
            turn = seed % len(arms)
            for i, arm in enumerate(arms[turn:] + arms[:turn]):
                source = Path(tmp) / f"s{seed}-{i}.yaml"
                source.write_text(yaml.safe_dump(variant(raw, VARIANTS.get(arm, {}))))
                out = run_arm(arm, source, Path(tmp) / f"s{seed}-{i}", cpus)
                runs[arm].append(out)
                print(f"seed {seed} {arm:12} {line(out)}", flush=True)
    print()
    for arm in arms:
        walls = [r["wall"] for r in runs[arm]]
        epochs = [r["epochs"] for r in runs[arm]]
        per_epoch = sum(walls) / max(sum(epochs), 1)
        bests = ", ".join(f"{s} {v:.4f}" for s, v in mean_best(runs[arm]).items())
        print(
            f"{arm:12} wall {_common.spread(walls)} s, epochs {_common.spread(epochs)}, "
            f"wall per epoch {per_epoch:.2f} s, mean best val_acc: {bests}"
        )
    pairs = [(ours, peer) for ours in VARIANTS for peer in ("plain Optuna", "stock Tune")]
    for ours, peer in pairs:  # the target's first
        if ours not in runs or peer not in runs:
            continue
        wall = sum(r["wall"] for r in runs[ours]) / sum(r["wall"] for r in runs[peer])
        _common.ratio(f"{name} wall {ours} / {peer}", wall, "<=", 1.0)
        ref, theirs = mean_best(runs[ours]), mean_best(runs[peer])
        gap = max(abs(theirs[s] - ref[s]) for s in ref)
        print(f"  largest gap in mean best val_acc, {peer} vs {ours}: {gap:.4f}")


def variant(raw: dict, changes: dict) -> dict:
    """The spec `raw` with a jal-search arm's changes (packs fill the machine on their own)."""
    out = {
        **raw,
        **{k: {**raw.get(k, {}), **v} if isinstance(v, dict) else v for k, v in changes.items()},
    }
    if changes.get("pack", 1) > 1:
        out.pop("max_concurrent_trials", None)
    return out


def line(out: dict) -> str:
    best = ", ".join(f"{s} {v:.4f}" for s, v in sorted(out["best"].items()))
    return (
        f"wall {out['wall']:6.1f} s  epochs {out['epochs']:4d}  "
        f"wall per epoch {out['wall'] / max(out['epochs'], 1):5.2f} s  best val_acc: {best}"
    )


def mean_best(runs: list[dict]) -> dict[str, float]:
    return {s: statistics.mean(r["best"][s] for r in runs) for s in sorted(runs[0]["best"])}


if __name__ == "__main__":
    main()
