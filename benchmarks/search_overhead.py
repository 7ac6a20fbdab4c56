"""What a search costs beyond its trials: wall time vs the ideal (trial time / concurrency).

Runs a shipped spec exactly as `jal-search run` does (its executor: a private local Ray with
Tune, reuse_actors — or, quick's, threads of this process; per-epoch journal rows and
checkpoints, MLflow on SQLite) and compares its wall time with the ideal:
the sum over trials of their training time (`epoch_seconds`, the loop's own clock) divided by the
concurrency, min(max_concurrent_trials, CPUs / cpus_per_trial). Measured separately, before the
search: Ray's start-up (`tune_adapter.connect` of a private cluster) and an actor's start-up (a new
worker process that imports the trial code) — the search pays the first once and the second once
per actor process it starts (counted from the trials' `pid`s; reused actors start no process).
A search with `executor: local` pays neither: they are not measured.

Target: search wall / ideal ≤ 1.10 for the quick spec (full mode, ~10 min). Short mode runs the
smoke spec (seconds-long trials), where the fixed costs dominate: its ratio is printed, not aimed.

    .venv/bin/python benchmarks/search_overhead.py --short    # smoke, ~1 min
    .venv/bin/python benchmarks/search_overhead.py            # quick, ~12 min
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import _common


def ray_startup(num_cpus: int) -> float:
    from jal_search import tune_adapter

    began = time.perf_counter()
    cluster = tune_adapter.connect(None, num_cpus)
    seconds = time.perf_counter() - began
    tune_adapter.disconnect(cluster)
    return seconds


def actor_startup(num_cpus: int, actors: int) -> list[float]:
    """Seconds from creating an actor to its first answer, after importing the trial code."""
    import ray

    from jal_search import tune_adapter

    @ray.remote(num_cpus=1)
    class Probe:
        def ready(self) -> int:
            import jal_search.tune_adapter  # noqa: F401 - what a trial actor imports

            return os.getpid()

    cluster = tune_adapter.connect(None, num_cpus)
    try:
        seconds = []
        for _ in range(actors):
            began = time.perf_counter()
            probe = Probe.remote()
            ray.get(probe.ready.remote())
            seconds.append(time.perf_counter() - began)
            ray.kill(probe)
        return seconds
    finally:
        tune_adapter.disconnect(cluster)


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0], timing=False).parse_args()
    from jal_search import search
    from jal_search.experiment import read_manifest, read_trials
    from jal_search.spec import load_spec

    name = "smoke" if args.short else "quick"
    spec = load_spec(name)
    cpus = os.cpu_count() or 1
    concurrency = min(
        spec.max_concurrent_trials or cpus, int(cpus // spec.resources.cpus_per_trial) or 1
    )
    repeats = args.repeats or (2 if args.short else 3)
    _common.header(
        "search_overhead",
        args,
        spec=f"{name}: {spec.description}",
        concurrency=concurrency,
        startup_repeats=repeats,
        note="the search runs once; start-ups are timed before it",
    )
    ray_s, actor_s = [0.0], [0.0]
    if spec.executor == "ray":
        ray_s = [ray_startup(cpus) for _ in range(repeats)]
        actor_s = actor_startup(cpus, repeats)
        print(f"ray start-up s: {_common.spread(ray_s)}")
        print(f"actor start-up s (new process + trial imports): {_common.spread(actor_s)}")

    with tempfile.TemporaryDirectory(prefix="jal-overhead-") as storage:
        began = time.perf_counter()
        path = search.run(name, name=f"overhead-{name}", num_cpus=cpus, storage_path=storage)
        wall = time.perf_counter() - began
        manifest = read_manifest(Path(path))
        trials = [
            t
            for s in manifest["settings"]
            for t in read_trials(Path(path), s["name"], s["failures"])
        ]
    span, work = busy_span(t.history for t in trials)
    epochs = [row for t in trials for row in t.history]
    training = sum(row.get("epoch_seconds", 0.0) for row in epochs)
    trainable = sum(t.history[-1].get("time_total_s", 0.0) for t in trials if t.history)
    processes = len({row["pid"] for row in epochs if "pid" in row})
    ideal = training / concurrency
    fixed = _common.median(ray_s) + _common.median(actor_s) * processes / concurrency
    print(
        f"\nsearch: {len(manifest['settings'])} settings, {len(trials)} trials, {len(epochs)} "
        f"epochs, {processes} processes for them ({spec.executor} executor)"
    )
    print(f"  wall {wall:.1f} s; training (Σ epoch_seconds) {training:.1f} s; ideal {ideal:.1f} s")
    print(
        f"  trained (Σ time_total_s) {trainable:.1f} s, "
        f"/concurrency {trainable / concurrency:.1f} s"
    )
    print(
        f"  explained by Ray's start-ups (once, and actors per slot) {fixed:.1f} s; rest "
        f"{wall - ideal - fixed:.1f} s (Tune scheduling, checkpoints, MLflow, idle slots)"
    )
    idle = concurrency * span - work
    print(
        f"  before the first trial and after the last (imports, data, Ray and Tune's start-up, "
        f"first actors, teardown, MLflow) {wall - span:.1f} s; idle trial slots in between "
        f"{idle:.1f} slot-s "
        f"(= {idle / concurrency:.1f} s of wall)"
    )
    _common.ratio(f"{name} search wall / ideal", wall / ideal, "<=", 1.10)


def busy_span(histories) -> tuple[float, float]:
    """(seconds from the first trial's start to the last result, Σ trainable seconds).

    From the journals' per-epoch `timestamp` and `time_total_s` (the trial's training time so
    far: its set-up before the first epoch is not counted).
    """
    starts, ends, work = [], [], 0.0
    for rows in histories:
        if rows:
            starts.append(rows[-1]["timestamp"] - rows[-1]["time_total_s"])
            ends.append(rows[-1]["timestamp"])
            work += rows[-1]["time_total_s"]
    return (max(ends) - min(starts), work) if starts else (0.0, 0.0)


if __name__ == "__main__":
    main()
