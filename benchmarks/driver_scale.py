"""The driver's cost per trial as a search grows: 100, 1,000 and 5,000 one-epoch trials.

Each size runs one search in this process, as `jal-search run` does it (a private local Ray, one
Tune experiment, the setting's searcher on its Optuna study, every trial's journal and
checkpoints, MLflow on SQLite): one noise setting of sklearn's digits, one epoch per trial,
random search, no scheduler, two trials at a time. Per trial it reports what the driver spends
beyond the trials themselves:

- wall beyond the ideal: (wall − Ray's start-up − Σ trial time / concurrency) / trials, where a
  trial's time runs from its journal's start to its last row (data, model, training, checkpoint);
- the driver's CPU seconds (this process: Tune's loop, the searcher, MLflow, the final sync);
- bytes the driver wrote (/proc/self/io `wchar`: state snapshots, the study, MLflow's database).

Before trials kept journals, Tune's experiment state was saved, and copied, at every step: the
bytes grew with trials × steps. Target: per-trial overhead at the largest size ≤ 1.5× the one at
the smallest.

    .venv/bin/python benchmarks/driver_scale.py --short        # 10 and 40 trials, ~1 min
    .venv/bin/python benchmarks/driver_scale.py                # 100, 1,000, 5,000: ~45 min
    .venv/bin/python benchmarks/driver_scale.py --sizes 100,1000
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import _common
import yaml

CONCURRENCY = 2


def spec(trials: int) -> dict:
    return {
        "name": f"scale-{trials}",
        "dataset": "digits",
        "loss": "jal_ce",
        "noise": {"symmetric": [0.4]},
        "space": {"alpha": {"loguniform": [0.3, 100]}, "beta": {"loguniform": [0.03, 10]}},
        "budget": {"trials": trials, "epochs": 1},
        "scheduler": {"type": "none"},
        "searcher": {"type": "random", "seed": 0},
        "resources": {"cpus_per_trial": 1},
        "max_concurrent_trials": CONCURRENCY,
    }


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(trials: int, folder: Path, ray_startup: float) -> dict[str, float]:
    from jal_search import search
    from jal_search.experiment import read_trials
    from jal_search.journal import read_journal

    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(trials)))
    cpu, wrote, began = cpu_seconds(), written_bytes(), time.perf_counter()
    experiment = search.run(str(path), num_cpus=CONCURRENCY, storage_path=str(folder / "runs"))
    wall = time.perf_counter() - began
    cpu, wrote = cpu_seconds() - cpu, written_bytes() - wrote
    records = read_trials(experiment, "symmetric-0.4", {})
    assert len(records) == trials, f"{len(records)} trials ran, not {trials}"
    own = 0.0
    for record in records:
        header, rows = read_journal(experiment / "symmetric-0.4" / record.trial_id)
        own += rows[-1]["timestamp"] - header["started"]
    beyond = (wall - ray_startup - own / CONCURRENCY) / trials
    print(
        f"{trials:>6} trials: wall {wall:7.1f} s, trials' own {own:7.1f} s; per trial: "
        f"{1000 * beyond:6.1f} ms wall beyond the ideal, {1000 * cpu / trials:6.1f} ms driver "
        f"CPU, {wrote / trials / 1024:7.1f} KiB written",
        flush=True,
    )
    return {"beyond": beyond, "cpu": cpu / trials, "bytes": wrote / trials}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--sizes", help="comma-separated trial counts (default 100,1000,5000)")
    args = p.parse_args()
    sizes = [
        int(n) for n in (args.sizes or ("10,40" if args.short else "100,1000,5000")).split(",")
    ]
    _common.header(
        "driver_scale",
        args,
        sizes=", ".join(map(str, sizes)),
        workload="digits, 1 epoch, random search, no scheduler, 2 trials at a time",
    )
    from jal_search import tune_adapter

    began = time.perf_counter()
    tune_adapter.disconnect(tune_adapter.connect(None, CONCURRENCY))
    ray_startup = time.perf_counter() - began  # what each search pays before its first trial
    print(f"ray start-up s: {ray_startup:.2f}", flush=True)
    figures = {}
    for trials in sizes:
        with tempfile.TemporaryDirectory(prefix="jal-scale-") as folder:
            figures[trials] = measure(trials, Path(folder), ray_startup)
    small, large = figures[sizes[0]], figures[sizes[-1]]
    # Short mode's sizes are too small for the target; its ratios are printed, not aimed.
    scale = f"{sizes[-1]} / {sizes[0]} trials"
    _common.ratio(f"driver CPU per trial {scale}", large["cpu"] / small["cpu"], "<=", 1.5)
    _common.ratio(f"bytes written per trial {scale}", large["bytes"] / small["bytes"], "<=", 1.5)
    _common.ratio(
        f"wall beyond the ideal per trial {scale}",
        max(large["beyond"], 1e-3) / max(small["beyond"], 1e-3),
        "<=",
        1.5,
    )


if __name__ == "__main__":
    main()
