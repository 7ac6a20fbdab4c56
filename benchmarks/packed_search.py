"""Packed searches vs unpacked: searches per hour and the best found, for TPE + ASHA.

Runs a shipped spec exactly as `jal-search run` does (private local Ray, Optuna TPE, ASHA,
journals, checkpoints, MLflow on SQLite) as shipped (one trial per CPU, `max_concurrent_trials`
as the spec sets it) and with `pack: K` (a pack worker per CPU, K slots each: K times the trials
at once; `max_concurrent_trials` dropped, since the workers already fill the machine). The arms
run interleaved over the searcher seeds (seed s: every arm once, in an order rotated by s).

Per arm: wall time of the whole search, epochs trained, and the best val_acc per noise setting
(the search's own selection). Ratio: searches per hour packed / unpacked (Σ wall unpacked / Σ
wall packed over the same seeds). Target (the issue's, for a CPU): ≥ 0.95 — on a CPU a member's
step costs what it costs alone, so packing must not cost more — with the same best within noise.

    .venv/bin/python benchmarks/packed_search.py --short   # smoke spec, K = 2, 1 seed, ~2 min
    .venv/bin/python benchmarks/packed_search.py           # quick spec, K = 2 / 4, 3 seeds, ~20 min
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import _common
import yaml


def run_arm(name: str, pack: int, seed: int, storage: Path) -> dict:
    """One search: wall seconds, epochs trained, best val_acc per setting."""
    from jal_search import results, search
    from jal_search.experiment import read_manifest, read_trials
    from jal_search.spec import load_spec

    spec = load_spec(name).model_dump(mode="json", exclude_none=True)
    spec["searcher"]["seed"] = seed
    if pack > 1:
        spec["pack"] = pack
        spec.pop("max_concurrent_trials", None)
    label = f"{name}-k{pack}-s{seed}"
    source = storage / f"{label}.yaml"
    source.write_text(yaml.safe_dump(spec))
    began = time.perf_counter()
    path = search.run(str(source), name=label, num_cpus=os.cpu_count(), storage_path=str(storage))
    wall = time.perf_counter() - began
    settings = read_manifest(Path(path))["settings"]
    epochs = sum(
        len(t.history) for s in settings for t in read_trials(Path(path), s["name"], s["failures"])
    )
    best = {n: sel.val_acc for n, sel in results.best(Path(path), scope="last").items()}
    return {"wall": wall, "epochs": epochs, "best": best}


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0], timing=False).parse_args()
    name = "smoke" if args.short else "quick"
    packs = [1, 2] if args.short else [1, 2, 4]
    seeds = list(range(args.repeats or (1 if args.short else 3)))
    _common.header(
        "packed_search",
        args,
        spec=name,
        arms=", ".join("unpacked" if k == 1 else f"pack {k}" for k in packs),
        seeds=seeds,
    )
    runs: dict[int, list[dict]] = {k: [] for k in packs}
    with tempfile.TemporaryDirectory(prefix="jal-packed-search-") as storage:
        for seed in seeds:
            order = packs[seed % len(packs) :] + packs[: seed % len(packs)]
            for k in order:
                out = run_arm(name, k, seed, Path(storage))
                runs[k].append(out)
                best = ", ".join(f"{s} {v:.4f}" for s, v in sorted(out["best"].items()))
                print(
                    f"seed {seed} {'unpacked' if k == 1 else f'pack {k}':9} wall "
                    f"{out['wall']:6.1f} s  epochs {out['epochs']:4d}  best val_acc: {best}",
                    flush=True,
                )
    print()
    base = runs[1]
    for k in packs:
        walls = [r["wall"] for r in runs[k]]
        epochs = [r["epochs"] for r in runs[k]]
        settings = sorted(runs[k][0]["best"])
        bests = "; ".join(
            f"{s} {statistics.mean(r['best'][s] for r in runs[k]):.4f}" for s in settings
        )
        print(
            f"{'unpacked' if k == 1 else f'pack {k}':9} wall {_common.spread(walls)} s, "
            f"epochs {_common.spread(epochs)}, mean best val_acc {bests}"
        )
    for k in packs[1:]:
        per_hour = sum(r["wall"] for r in base) / sum(r["wall"] for r in runs[k])
        _common.ratio(f"{name} searches per hour, pack {k} / unpacked", per_hour, ">=", 0.95)
        gap = max(
            abs(
                statistics.mean(r["best"][s] for r in runs[k])
                - statistics.mean(r["best"][s] for r in base)
            )
            for s in base[0]["best"]
        )
        print(f"  largest gap in mean best val_acc, pack {k} vs unpacked: {gap:.4f}")


if __name__ == "__main__":
    main()
