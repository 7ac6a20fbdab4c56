"""Plots of one search for people, and a markdown summary that links everything.

`write_report` writes into `<experiment>/results/`:

    plots/accuracy_vs_noise.png   best trial's test (solid) and val (dashed) accuracy vs noise
                                  rate, one line per noise type (clean joins each at rate 0)
    plots/<setting>_alpha_beta.png  every trial at its (alpha, beta), coloured by val_acc
    plots/<setting>_a.png           val_acc vs `a`, AMSE's bound a_min as a vertical line
                                  (in both, trials ASHA stopped are triangles: their score is
                                  from an earlier epoch than the circles')
    plots/<setting>_curves.png      val_acc, test_acc, noisy_fit, memorized vs epoch of the
                                  top-5 trials: memorisation shows as noisy_fit and memorized
                                  rising while test_acc falls
    plots/<setting>_rungs.png       ASHA's rungs: how many trials reached each epoch
    summary.md                      links the tables, the best configs and every plot

val_acc in the plots is the selection score of the chosen scope (see `results`). Failed and
diverged trials have no score: they appear as grey crosses where their parameters are known.
A plot whose parameters the search lacks (a baseline without `a`) is skipped, as is the noise
rate plot when no setting has a numeric rate. Figures are built with `matplotlib.figure.Figure`
(Agg, no pyplot): nothing global, nothing left open.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from matplotlib import ticker
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from jal_search import results
from jal_search.results import PARAM_PREFIX, Experiment, Ref, Selection

TOP_CURVES = 5
CURVE_METRICS = ("val_acc", "test_acc", "noisy_fit", "memorized")
PLOTS_DIR = "plots"


def figures(ref: Ref, scope: str = "last", last_k: int = 3) -> dict[str, Figure]:
    """Every plot of the report by file stem, in report order."""
    ex = results.with_trials(ref)
    trials, epochs = results.trials_table(ex), results.epochs_table(ex)
    ranked = results.rank(trials, epochs, scope, last_k)
    label = results.scope_label(scope, last_k)
    out: dict[str, Figure] = {}
    noise = _accuracy_vs_noise(ex, {s: c[0] for s, c in ranked.items() if c}, label)
    if noise is not None:
        out["accuracy_vs_noise"] = noise
    rows = trials.to_pylist()
    for s in ex.settings:
        candidates = ranked.get(s.name, [])
        mine = [r for r in rows if r["setting"] == s.name]
        if not mine:
            continue
        scores = {c.trial_id: c.val_acc for c in candidates}
        params = {  # the parameters these trials sampled (fixed ones do not vary: no plot)
            k.removeprefix(PARAM_PREFIX)
            for r in mine
            for k, v in r.items()
            if k.startswith(PARAM_PREFIX) and v is not None
        }
        if {"alpha", "beta"} <= params:
            out[f"{s.name}_alpha_beta"] = _alpha_beta(s.name, mine, scores, label)
        if "a" in params:
            out[f"{s.name}_a"] = _versus_a(s.name, mine, scores, s.a_min, label)
        if candidates:
            out[f"{s.name}_curves"] = _curves(s.name, candidates[:TOP_CURVES], epochs, label)
        out[f"{s.name}_rungs"] = _rungs(s.name, mine, ex.spec.budget.epochs)
    return out


def write_report(
    ref: Ref, scope: str = "last", last_k: int = 3, out: Path | None = None
) -> list[Path]:
    """Write the tables, every PNG and summary.md into `out` (default results/); returns the PNGs
    then summary.md."""
    ex = results.experiment(ref)
    root = out or ex.results_dir
    tables = results.write_tables(ex, scope, last_k, root)
    written = [
        results.atomic_write(
            root / PLOTS_DIR / f"{stem}.png", lambda p, f=fig: f.savefig(p, format="png")
        )
        for stem, fig in figures(ex, scope, last_k).items()
    ]
    summary = _summary(ex, root, tables, written, scope, last_k)
    written.append(results.atomic_write(root / "summary.md", lambda p: p.write_text(summary)))
    return written


def write_setting_report(ex: Experiment, setting: str, out: Path) -> list[Path]:
    """`write_report` of one noise setting alone into `out`: its own tables, plots and summary,
    as its MLflow parent run holds them."""
    one = dataclasses.replace(ex, settings=[s for s in ex.settings if s.name == setting])
    return write_report(one, out=out)


# ----------------------------------------------------------------------------------------- plots
def _accuracy_vs_noise(ex: Experiment, best: dict[str, Selection], scope: str) -> Figure | None:
    points: dict[str, list[tuple[float, Selection]]] = {}
    clean = best.get("clean")
    for s in ex.settings:
        rate = s.plan.setting.rate
        if s.name in best and s.plan.setting.type != "clean" and isinstance(rate, float):
            points.setdefault(s.plan.setting.type, []).append((rate, best[s.name]))
    if not points and clean is None:
        return None
    if clean is not None:  # the clean setting is rate 0 of every noise type
        for series in points.values() or [points.setdefault("clean", [])]:
            series.append((0.0, clean))
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colours = {}
    for noise_type, series in points.items():
        series.sort(key=lambda p: p[0])
        x = [r for r, _ in series]
        (line,) = ax.plot(
            x, [100 * b.test_acc for _, b in series], "o-", label=f"{noise_type} test"
        )
        colours[noise_type] = line.get_color()
        ax.plot(
            x,
            [100 * b.val_acc for _, b in series],
            "s--",
            color=colours[noise_type],
            label=f"{noise_type} val",
        )
    ax.set(xlabel="noise rate", ylabel="accuracy (%)")
    ax.set_title(f"{ex.name} / {ex.spec.loss}: best trial per setting (val_acc, {scope})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _split(
    rows: list[dict[str, Any]], scores: dict[str, float], x: str, y: str | None
) -> tuple[list[tuple[float, float, float, bool]], list[tuple[float, float]]]:
    """Points (x, y, score, stopped by ASHA) of scored trials, and (x, y) of unscored ones with
    known params."""
    scored, unscored = [], []
    for r in rows:
        px = r.get(PARAM_PREFIX + x)
        py = r.get(PARAM_PREFIX + y) if y else scores.get(r["trial_id"])
        if px is None:
            continue
        if r["trial_id"] in scores and py is not None:
            scored.append((px, py, scores[r["trial_id"]], r["status"] == "stopped"))
        elif y is not None and py is not None:
            unscored.append((px, py))
    return scored, unscored


# Trials ASHA stopped are scored at an earlier epoch than completed ones: another marker.
KINDS = ((False, "o", "full budget"), (True, "v", "stopped early (scored at an earlier epoch)"))


def _alpha_beta(
    setting: str, rows: list[dict[str, Any]], scores: dict[str, float], scope: str
) -> Figure:
    fig = Figure(figsize=(5.6, 4.4), layout="constrained")
    ax = fig.add_subplot()
    scored, unscored = _split(rows, scores, "alpha", "beta")
    if scored:
        colours = [100 * p[2] for p in scored]
        norm = Normalize(min(colours), max(colours))  # one scale for both kinds
        for stopped, marker, label in KINDS:
            mine = [p for p in scored if p[3] == stopped]
            if mine:
                xs, ys, cs, _ = zip(*mine, strict=True)
                colour = [100 * c for c in cs]
                ax.scatter(
                    xs,
                    ys,
                    c=colour,
                    cmap="viridis",
                    norm=norm,
                    s=36,
                    marker=marker,
                    edgecolors="k",
                    label=label,
                )
        fig.colorbar(ScalarMappable(norm, "viridis"), ax=ax, label=f"val_acc (%, {scope})")
    if unscored:
        ax.scatter(*zip(*unscored, strict=True), marker="x", color="grey", label="failed/diverged")
    if scored or unscored:
        ax.legend(fontsize="small")
    _log_if_positive(ax, [p[0] for p in scored + unscored], [p[1] for p in scored + unscored])
    ax.set(xlabel="alpha", ylabel="beta", title=f"{setting}: val_acc over (alpha, beta)")
    return fig


def _versus_a(
    setting: str,
    rows: list[dict[str, Any]],
    scores: dict[str, float],
    a_min: float | None,
    scope: str,
) -> Figure:
    fig = Figure(figsize=(5.6, 4.0), layout="constrained")
    ax = fig.add_subplot()
    scored, _ = _split(rows, scores, "a", None)
    for stopped, marker, label in KINDS:
        mine = [p for p in scored if p[3] == stopped]
        if mine:
            xs, ys, _, _ = zip(*mine, strict=True)
            ax.scatter(xs, [100 * y for y in ys], s=36, marker=marker, edgecolors="k", label=label)
    if a_min is not None:
        ax.axvline(a_min, color="crimson", linestyle="--", label=f"AMSE bound a_min = {a_min:.3g}")
    _log_if_positive(ax, [p[0] for p in scored] + ([a_min] if a_min else []), [])
    ax.set(xlabel="a", ylabel=f"val_acc (%, {scope})", title=f"{setting}: val_acc vs a")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _curves(setting: str, top: list[Selection], epochs: pa.Table, scope: str) -> Figure:
    fig = Figure(figsize=(9.0, 6.0), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    rows = epochs.filter(pc.equal(epochs["setting"], setting)).to_pylist()
    for rank, c in enumerate(top, 1):
        curve = sorted((r for r in rows if r["trial_id"] == c.trial_id), key=lambda r: r["epoch"])
        for ax, metric in zip(axes, CURVE_METRICS, strict=True):
            ax.plot(
                [r["epoch"] for r in curve],
                [_nan(r[metric]) for r in curve],
                marker="o",
                markersize=3,
                label=f"#{rank} {c.trial_id}",
            )
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        ax.set(title=metric, xlabel="epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{setting}: top {len(top)} trials by val_acc ({scope})")
    return fig


def _rungs(setting: str, rows: list[dict[str, Any]], max_epochs: int) -> Figure:
    """Bars: trials that reached at least epoch e, for e = 1..max_epochs."""
    fig = Figure(figsize=(5.6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    reached = [r["epochs"] for r in rows]
    budgets = list(range(1, max_epochs + 1))
    counts = [sum(n >= e for n in reached) for e in budgets]
    bars = ax.bar(budgets, counts, color="steelblue")
    ax.bar_label(bars)
    ax.set_xticks(budgets)
    ax.set(
        xlabel="epoch",
        ylabel="trials that reached it",
        title=f"{setting}: rungs ({len(rows)} trials)",
    )
    return fig


def _log_if_positive(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Log axes for positive parameters (searched log-uniformly), labelled as plain numbers."""
    for set_scale, axis, values in ((ax.set_xscale, ax.xaxis, xs), (ax.set_yscale, ax.yaxis, ys)):
        if values and min(values) > 0:
            set_scale("log")
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


# --------------------------------------------------------------------------------------- summary
def _summary(
    ex: Experiment,
    root: Path,
    tables: dict[str, Path],
    plots: list[Path],
    scope: str,
    last_k: int,
) -> str:
    spec = ex.spec
    lines = [
        f"# {ex.name}: {spec.dataset} / {spec.loss}",
        "",
        f"{len(ex.settings)} noise settings × ≤{spec.budget.trials} trials × ≤{spec.budget.epochs}"
        f" epochs; searcher {spec.searcher.type}, scheduler {spec.scheduler.type}. Best configs "
        f"selected on val_acc ({spec.val_labels} validation labels), scope "
        f"`{results.scope_label(scope, last_k)}`; test accuracy is reported only.",
        "",
        "## Tables",
        "",
        f"- [epochs.parquet]({tables['epochs'].name}): one row per trial per epoch",
        f"- [trials.parquet]({tables['trials'].name}): one row per trial",
        f"- [best.json]({tables['best'].name}): the selection",
    ]
    if (root / "final.md").is_file():
        lines.append("- [final.md](final.md): multi-seed re-evaluation of the best configs")
    lines += ["", "## Best configs", "", "```", results.top_table(ex, 5, scope, last_k), "```"]
    lines += ["", "## Plots", ""]
    for png in plots:
        lines += [f"### {png.stem}", "", f"![{png.stem}]({png.relative_to(root).as_posix()})", ""]
    return "\n".join(lines)
