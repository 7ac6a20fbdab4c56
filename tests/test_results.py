"""Results: parquet tables, best-config selection per scope, export, summaries and plots.

Experiments are fabricated on disk (tests/fabricate.py) exactly as `search.run` and Tune leave
them, so every expected value below is computed from the fabricated curves, without Ray.
"""

import json
import math
import statistics
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from fabricate import SPEC, FakeTrial, clean_acc, fabricate

from jal_search import report, results, search
from jal_search.config import load_exported
from jal_search.errors import UserError
from jal_search.experiment import MANIFEST
from jal_search.journal import JOURNAL
from jal_search.spec import SettingPlan, parse_spec, plan
from jal_search.train import run_trial

SYM, ASYM = "symmetric-0.4", "asymmetric-0.2"
PARAMS = ["a", "alpha", "beta"]
CE = {"loss": "ce", "space": {}, "noise": {"symmetric": [0.4]}}  # a baseline without parameters


def p(a: float, alpha: float = 1.0, beta: float = 1.0) -> dict[str, float]:
    return {"alpha": alpha, "beta": beta, "a": a}


# Symmetric: the answer differs per scope. last → A (0.80); best-epoch → B (0.95);
# last-3-mean → C ((0.85 + 0.86 + 0.78) / 3 = 0.83 > B's 0.80 > F's 0.79 > A's 0.70).
# D (diverged) and E (failed) score 0.99 on early epochs and must never win.
TRIALS = {
    SYM: [
        FakeTrial("a0000001", p(10.0, 2.0, 0.5), [0.50, 0.60, 0.70, 0.80]),
        FakeTrial("b0000002", p(20.0, 3.0, 0.7), [0.60, 0.95, 0.70, 0.75]),
        FakeTrial("c0000003", p(30.0, 4.0, 0.9), [0.50, 0.85, 0.86, 0.78]),
        FakeTrial("d0000004", p(40.0, 5.0, 1.1), [0.99, 0.99, 0.99], diverged=True),
        FakeTrial("e0000005", p(50.0, 6.0, 1.3), [0.99, 0.99], error="RuntimeError: OOM"),
        FakeTrial("f0000006", p(5.0, 7.0, 1.5), [0.79]),
    ],
    # Asymmetric: H, stopped by ASHA at epoch 2, beats G's full run on `last`.
    ASYM: [
        FakeTrial("g0000007", p(12.0), [0.50, 0.60, 0.70, 0.85]),
        FakeTrial("h0000008", p(13.0), [0.60, 0.90]),
    ],
}
STATUS = {
    "a0000001": "completed",
    "b0000002": "completed",
    "c0000003": "completed",
    "d0000004": "diverged",
    "e0000005": "failed",
    "f0000006": "stopped",
    "g0000007": "completed",
    "h0000008": "stopped",
}


@pytest.fixture
def path(tmp_path):
    return fabricate(tmp_path, TRIALS)


def fake(trial_id: str) -> FakeTrial:
    return next(t for ts in TRIALS.values() for t in ts if t.trial_id == trial_id)


def plans() -> dict[str, SettingPlan]:
    return {pl.name: pl for pl in plan(parse_spec(SPEC))}


def same(x, y) -> bool:
    return x == pytest.approx(y, nan_ok=True) if isinstance(y, float) else x == y


# ------------------------------------------------------------------------------------- tables
def test_epochs_table_has_one_row_per_trial_per_epoch(path):
    table = results.epochs_table(path)
    assert table.schema == results.schema("e", PARAMS)
    assert table.num_rows == sum(len(t.val_acc) for ts in TRIALS.values() for t in ts)
    rows = table.to_pylist()
    for setting, fakes in TRIALS.items():
        for t in fakes:
            mine = [r for r in rows if r["trial_id"] == t.trial_id]
            expected = t.rows(setting)
            assert [r["setting"] for r in mine] == [setting] * len(expected)
            assert [r["epoch"] for r in mine] == [int(e["epoch"]) for e in expected]
            for column in ("val_acc", "test_acc", "train_loss", "noisy_fit"):
                assert all(same(r[column], e[column]) for r, e in zip(mine, expected, strict=True))
            seconds = [e["epoch_seconds"] for e in expected]  # training time so far
            totals = [sum(seconds[: i + 1]) for i in range(len(seconds))]
            assert [r["time_total_s"] for r in mine] == pytest.approx(totals)
            assert [r["diverged"] for r in mine] == [e["diverged"] == 1.0 for e in expected]
            assert all(r[f"param_{k}"] == v for r in mine for k, v in t.params.items())
            assert {r["noise_rate"] for r in mine} == {float(setting.split("-")[1])}


def test_trials_table_statuses_and_metrics(path):
    table = results.trials_table(path)
    assert table.schema == results.schema("t", PARAMS)
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(STATUS)
    manifest = json.loads((path / MANIFEST).read_text())
    a_min = {s["name"]: s["a_min"] for s in manifest["settings"]}
    for trial_id, row in rows.items():
        t = fake(trial_id)
        vals = [r["val_acc"] for r in t.rows(row["setting"])]  # NaN where it diverged
        finite = [(v, i + 1) for i, v in enumerate(vals) if math.isfinite(v)]
        best_val, best_epoch = max(finite, key=lambda x: (x[0], -x[1]))
        assert row["status"] == STATUS[trial_id]
        assert row["failure"] == t.error
        assert row["epochs"] == len(t.val_acc) and row["max_epochs"] == 4
        assert same(row["final_val_acc"], vals[-1])
        assert same(row["final_test_acc"], clean_acc(vals[-1]))
        assert (row["best_epoch"], row["best_val_acc"]) == (best_epoch, best_val)
        assert row["best_test_acc"] == pytest.approx(clean_acc(best_val))
        assert row["seed"] == row["noise_seed"] == 123  # the spec's default seed
        assert row["label_hash"] == f"hash-{row['setting']}"
        assert row["a_min"] == a_min[row["setting"]]
        assert row["below_a_min"] is False  # exclude mode: every a is above the bound
        assert row["mlflow_run_id"] is None


def test_mlflow_runs_and_flagged_a_from_the_manifest(tmp_path):
    trials = {SYM: [FakeTrial("a0000001", p(1.0), [0.5]), FakeTrial("b0000002", p(9.0), [0.6])]}
    path = fabricate(
        tmp_path,
        trials,
        spec={
            "amse_bound": "flag",
            "space": {
                "a": {"loguniform": [0.5, 60]},
                "alpha": {"uniform": [0.1, 9]},
                "beta": {"uniform": [0.1, 9]},
            },
        },
    )
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["mlflow_runs"] = {SYM: {"b0000002": "run-b"}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    rows = {r["trial_id"]: r for r in results.trials_table(path).to_pylist()}
    a_min = manifest["settings"][0]["a_min"]
    assert 1.0 < a_min < 9.0
    assert rows["a0000001"]["below_a_min"] is True and rows["b0000002"]["below_a_min"] is False
    assert (rows["a0000001"]["mlflow_run_id"], rows["b0000002"]["mlflow_run_id"]) == (None, "run-b")


def test_write_tables_is_atomic_and_stores_the_scope(path):
    files = results.write_tables(path, scope="best-epoch")
    for name, table in (
        ("epochs", results.epochs_table(path)),
        ("trials", results.trials_table(path)),
    ):
        stored = pq.read_table(files[name])
        assert stored.schema.equals(table.schema, check_metadata=True)
        assert repr(stored.to_pylist()) == repr(table.to_pylist())  # repr: NaN equals NaN
    selection = json.loads(files["best"].read_text())
    assert selection["scope"] == "best-epoch" and selection["metric"] == "val_acc"
    assert selection["best"][SYM]["trial_id"] == "b0000002"
    assert not [f for f in files["epochs"].parent.iterdir() if f.name.endswith(".tmp")]
    assert "param_<name>" in results.columns_markdown()


def test_a_running_setting_reports_running_trials(tmp_path):
    path = fabricate(tmp_path, {SYM: [FakeTrial("a0000001", p(9.0), [0.5, 0.6])]}, status="running")
    (row,) = results.trials_table(path).to_pylist()
    assert row["status"] == "running"
    assert results.best(path)[SYM].trial_id == "a0000001"  # it competes with what it has


# ---------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    ("scope", "winner", "val", "test"),
    [
        ("last", "a0000001", 0.80, clean_acc(0.80)),
        ("best-epoch", "b0000002", 0.95, clean_acc(0.95)),
        (
            "last-k-mean",
            "c0000003",
            statistics.mean([0.85, 0.86, 0.78]),
            statistics.mean(clean_acc(v) for v in [0.85, 0.86, 0.78]),
        ),
    ],
)
def test_selection_per_scope(path, scope, winner, val, test):
    ex = results.load_experiment(path)
    best = results.select_best(results.trials_table(ex), results.epochs_table(ex), scope, 3)
    chosen = best[SYM]
    assert (chosen.trial_id, chosen.scope) == (winner, scope)
    assert chosen.val_acc == pytest.approx(val) and chosen.test_acc == pytest.approx(test)
    assert chosen.params == fake(winner).params
    # Failed and diverged trials never appear among the candidates, whatever their scores.
    ranked = results.rank(results.trials_table(ex), results.epochs_table(ex), scope, 3)
    assert {c.trial_id for c in ranked[SYM]} == {"a0000001", "b0000002", "c0000003", "f0000006"}


def test_stopped_trial_competes_with_the_epochs_it_reached(path):
    best = results.best(path, "last")[ASYM]
    assert (best.trial_id, best.epochs, best.status) == ("h0000008", 2, "stopped")
    assert best.val_acc == 0.90
    # last-k-mean averages the last min(k, epochs reached): H's two epochs give 0.75, which
    # beats G's last three (0.60, 0.70, 0.85 → 0.7167).
    h = results.best(path, "last-k-mean", last_k=3)[ASYM]
    assert (h.trial_id, h.val_acc) == ("h0000008", pytest.approx(statistics.mean([0.6, 0.9])))


def test_ties_go_to_more_epochs_then_the_smaller_trial_id(tmp_path):
    trials = {
        SYM: [
            FakeTrial("a1", p(9.0), [0.70, 0.88]),  # smallest id, fewer epochs
            FakeTrial("z9", p(9.0), [0.50, 0.60, 0.70, 0.88]),
            FakeTrial("m5", p(9.0), [0.40, 0.60, 0.70, 0.88]),
        ]
    }
    ex = results.load_experiment(fabricate(tmp_path, trials))
    ranked = results.rank(results.trials_table(ex), results.epochs_table(ex), "last")
    assert [c.trial_id for c in ranked[SYM]] == ["m5", "z9", "a1"]


def test_a_setting_with_only_failed_or_diverged_trials_has_no_best(tmp_path):
    trials = {
        SYM: [
            FakeTrial("d1", p(9.0), [0.9, 0.9], diverged=True),
            FakeTrial("e1", p(9.0), [0.9], error="boom"),
        ]
    }
    path = fabricate(tmp_path, trials)
    assert results.best(path, "best-epoch") == {}
    assert "no eligible trial" in results.top_table(path)
    with pytest.raises(UserError, match="no eligible trial"):
        results.export(path, tmp_path / "best.yaml")


def test_bad_scope_is_a_user_error(path):
    with pytest.raises(UserError, match="scope: 'first' is not one of"):
        results.best(path, "first")
    with pytest.raises(UserError, match="last_k"):
        results.best(path, "last-k-mean", last_k=0)


def test_top_table_lists_the_ranking_with_scope_and_counts(path):
    text = results.top_table(path, k=2, scope="best-epoch")
    assert "scope best-epoch" in text and "test_acc is reported only" in text
    sym = text.split(SYM)[1].split(ASYM)[0]
    assert "3 completed, 1 stopped, 1 diverged, 1 failed" in sym
    lines = [line.split() for line in sym.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[2]) for r in lines] == [
        ("1", "b0000002", "0.9500"),
        ("2", "c0000003", "0.8600"),
    ]
    # the clean-label estimate and its interval at the scored epoch (fabricate: 0.25 + val/2)
    assert " ".join(lines[0][3:6]) == "0.7250 [0.6750, 0.7750]"
    # a scope whose epochs may lack test_acc says why (fabricate's spec: test_eval milestones)
    assert "(spec test_eval: milestones)" in text
    assert "test_eval" not in results.top_table(path, k=2)  # scope last: always evaluated


def test_search_best_trials_uses_the_last_scope(path):
    best = {b.setting: b for b in search.best_trials(path)}
    assert (best[SYM].trial_id, best[ASYM].trial_id) == ("a0000001", "h0000008")
    line = f"{SYM}      0.8000 0.6500 [0.6000, 0.7000]   0.9000      4  a=10, alpha=2, beta=0.5"
    assert line in search.summary_table(path)


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_export_round_trip_reproduces_the_config(path, tmp_path, suffix):
    out = results.export(path, tmp_path / f"best{suffix}", scope="best-epoch")
    for setting, winner in ((SYM, "b0000002"), (ASYM, "h0000008")):
        expected = plans()[setting].trial(fake(winner).params).resolve()
        loaded = load_exported(out, setting)
        assert loaded == expected
        assert loaded.epochs == 4 and loaded.loss_params["a"] == fake(winner).params["a"]
        assert None not in (loaded.model, loaded.lr, loaded.batch_size, loaded.l1, loaded.l2)
    text = out.read_text()
    doc = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert doc["selection"] == {
        "metric": "val_acc",
        "scope": "best-epoch",
        "last_k": None,
        "val_labels": "noisy",
    }
    entry = doc["settings"][SYM]
    assert (entry["trial_id"], entry["val_acc"]) == ("b0000002", 0.95)
    assert entry["test_acc"] == pytest.approx(clean_acc(0.95))
    assert doc["source"]["experiment"] == "fab" and doc["source"]["path"] == str(path)


def test_load_exported_names_the_problem(path, tmp_path):
    out = results.export(path, tmp_path / "best.yaml")
    with pytest.raises(UserError, match=f"no setting 'clean'; available: {SYM}, {ASYM}"):
        load_exported(out, "clean")
    with pytest.raises(UserError, match="choose --setting"):
        load_exported(out)
    doc = yaml.safe_load(out.read_text())
    for edit, field in (
        ({"lr": -0.1}, f"best.yaml:settings.{SYM}.config.lr"),
        ({"lrr": 0.1}, f"best.yaml:settings.{SYM}.config.lrr"),
        ({"loss_params": {"alpah": 1.0}}, "loss_params: .* no parameter 'alpah'"),
    ):
        edited = {**doc, "settings": {SYM: {**doc["settings"][SYM]}}}
        edited["settings"][SYM]["config"] = {**doc["settings"][SYM]["config"], **edit}
        out.write_text(yaml.safe_dump(edited))
        with pytest.raises(UserError, match=field) as err:
            load_exported(out)  # a single setting needs no --setting
        assert "\n" not in str(err.value)
    out.write_text("settings: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_exported(out, SYM)
    with pytest.raises(UserError, match="cannot read"):
        load_exported(tmp_path / "absent.yaml", SYM)
    with pytest.raises(UserError, match="must end in"):
        results.export(path, tmp_path / "best.txt")


# ------------------------------------------------------------------------- corrupt experiments
def corrupt_manifest(path, text):
    (path / MANIFEST).write_text(text)


def edit_manifest(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def edit_header(trial: Path, edit) -> None:
    """Apply `edit` to a trial journal's header, in place."""
    lines = (trial / JOURNAL).read_text().splitlines()
    first = json.loads(lines[0])
    edit(first["header"])
    (trial / JOURNAL).write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")


def test_export_writes_the_config_the_trial_recorded_not_one_planned_anew(path, tmp_path):
    # A profile or loss table changed since the search must not change what "best" trained.
    best = results.best(path)[SYM].trial_id
    edit_header(path / SYM / best, lambda h: h["config"].update(lr=0.0123))
    out = results.export(path, tmp_path / "best.yaml")
    assert load_exported(out, SYM).lr == 0.0123
    assert plans()[SYM].trial(fake(best).params).resolve().lr != 0.0123


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: corrupt_manifest(path, "{not json"), "unreadable manifest"),
        (lambda path: edit_manifest(path, lambda m: m.pop("settings")), "'settings' missing"),
        (
            lambda path: edit_manifest(path, lambda m: m["spec"]["budget"].update(epochs=-1)),
            "experiment.json:spec.budget.epochs",
        ),
        (
            lambda path: edit_manifest(path, lambda m: m["settings"][0].update(name="clean")),
            "names 'clean', not a noise setting",
        ),
        (lambda path: __import__("shutil").rmtree(path / SYM), "marks setting symmetric-0.4 done"),
        (
            lambda path: edit_header(
                path / SYM / "a0000001", lambda h: h["params"].update(alpha="hi")
            ),
            "a0000001/journal.jsonl: no numeric value for",
        ),
        (
            lambda path: edit_header(path / SYM / "a0000001", lambda h: h.pop("config")),
            "a0000001/journal.jsonl: no config",
        ),
        (lambda path: (path / MANIFEST).unlink(), "no experiment.json found"),
    ],
)
def test_corrupt_or_partial_experiments_are_one_line_user_errors(path, damage, message):
    damage(path)
    for read in (results.trials_table, results.epochs_table, report.figures):
        with pytest.raises(UserError, match=message) as err:
            read(path)
        assert "\n" not in str(err.value)


def test_an_experiment_without_trials_says_so(tmp_path):
    path = fabricate(tmp_path, {}, status="pending")
    assert results.trials_table(path).num_rows == 0  # intact, just empty
    assert search.best_trials(path) == [] and search.summary_table(path) == "no finished trials yet"
    for verb in (results.write_tables, results.top_table, report.figures, report.write_report):
        with pytest.raises(UserError, match="no trials yet; run or resume it"):
            verb(path)
    with pytest.raises(UserError, match="no trials yet"):
        results.export(path, tmp_path / "best.yaml")


# ---------------------------------------------------------------------------- final, compare
def final_row(setting: str, seed: int, test: float, status: str = "completed") -> dict:
    return {
        "setting": setting,
        "loss": "jal_ce",
        "seed": seed,
        "test_acc": test,
        "val_acc": test - 0.1,
        "status": status,
    }


def test_final_and_compare_tables(path, tmp_path):
    sym, asym = [0.91, 0.93, 0.96], [0.90]
    rows = [final_row(SYM, seed, v) for seed, v in enumerate(sym)]
    rows += [final_row(ASYM, 0, asym[0]), final_row(ASYM, 1, math.nan, "diverged")]
    files = results.write_final(path, rows)
    assert pq.read_table(files["final"]).num_rows == 5
    sym_cell = f"{100 * statistics.mean(sym):.2f} ± {100 * statistics.stdev(sym):.2f} (n=3)"
    asym_cell = f"{100 * asym[0]:.2f} (n=1 of 2)"  # one seed: no std; the diverged seed shown
    assert f"| jal_ce | {sym_cell} | {asym_cell} |" in files["final_md"].read_text()
    assert results.markdown_final(path) in files["final_md"].read_text()

    # A baseline without a multi-seed evaluation: its best search trial, marked as such.
    ce = fabricate(
        tmp_path / "ce",
        {SYM: [FakeTrial("c1", {}, [0.4, 0.6]), FakeTrial("c2", {}, [0.7, 0.5])]},
        spec={**CE, "name": "ce"},
    )
    table = results.compare([path, ce])
    lines = table.splitlines()
    assert lines[0] == f"| loss | {SYM} | {ASYM} |"
    assert f"| jal_ce | {sym_cell} | {asym_cell} |" in lines
    assert f"| ce | {100 * clean_acc(0.6):.2f} (search, n=1) | – |" in lines
    assert "(search, n=1)`: no multi-seed evaluation" in table


def test_final_helpers_refuse_bad_input(path):
    with pytest.raises(UserError, match="run `jal-search evaluate"):
        results.markdown_final(path)
    with pytest.raises(ValueError, match="lacks"):
        results.final_table([{"setting": SYM, "loss": "jal_ce", "seed": 0}])


# -------------------------------------------------------------------------------------- plots
def test_figures_carry_the_data(path):
    figures = report.figures(path, scope="last")
    expected = {"accuracy_vs_noise"} | {
        f"{s}_{kind}" for s in (SYM, ASYM) for kind in ("alpha_beta", "a", "curves", "rungs")
    }
    assert set(figures) == expected
    eligible = ["a0000001", "b0000002", "c0000003", "f0000006"]  # scored under `last`
    last = {t: fake(t).val_acc[-1] for t in eligible}

    ax = figures[f"{SYM}_alpha_beta"].axes[0]
    full, stopped, crosses = ax.collections
    # f0000006 (1 epoch) was stopped by ASHA: apart, its score being from an earlier epoch
    assert [c.get_label() for c in (full, stopped)] == [label for _, _, label in report.KINDS]
    for dots, ids in ((full, eligible[:3]), (stopped, ["f0000006"])):
        assert sorted(map(tuple, dots.get_offsets())) == sorted(
            (fake(t).params["alpha"], fake(t).params["beta"]) for t in ids
        )
        assert sorted(dots.get_array()) == pytest.approx(sorted(100 * last[t] for t in ids))
        assert dots.norm.vmin == pytest.approx(100 * min(last.values()))  # one colour scale
    assert len(crosses.get_offsets()) == 2  # the failed and the diverged trial

    ax = figures[f"{SYM}_a"].axes[0]
    assert [len(c.get_offsets()) for c in ax.collections] == [3, 1]
    assert ax.collections[1].get_label().startswith("stopped early")
    a_min = results.load_experiment(path).settings[0].a_min
    assert [tuple(line.get_xdata()) for line in ax.lines] == [(a_min, a_min)]

    axes = figures[f"{SYM}_curves"].axes
    assert [a.get_title() for a in axes] == ["val_acc", "test_acc", "noisy_fit", "memorized"]
    ranked_ids = ["a0000001", "f0000006", "c0000003", "b0000002"]  # by last val_acc
    assert [line.get_label() for line in axes[0].lines] == [
        f"#{i} {t}" for i, t in enumerate(ranked_ids, 1)
    ]
    assert list(axes[0].lines[0].get_ydata()) == fake("a0000001").val_acc

    bars = figures[f"{SYM}_rungs"].axes[0].patches
    reached = [len(t.val_acc) for t in TRIALS[SYM]]
    assert [b.get_height() for b in bars] == [sum(n >= e for n in reached) for e in range(1, 5)]

    noise = figures["accuracy_vs_noise"].axes[0]
    test_lines = {line.get_label(): line for line in noise.lines}
    assert list(test_lines["symmetric test"].get_ydata()) == [pytest.approx(100 * clean_acc(0.8))]
    assert list(test_lines["asymmetric val"].get_ydata()) == [pytest.approx(90.0)]


def test_baseline_without_parameters_skips_parameter_plots(tmp_path):
    ce = fabricate(tmp_path, {SYM: [FakeTrial("c1", {}, [0.4, 0.6])]}, spec=CE)
    assert set(report.figures(ce)) == {"accuracy_vs_noise", f"{SYM}_curves", f"{SYM}_rungs"}


def png_size(file) -> tuple[int, int]:
    header = file.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_write_report_writes_pngs_and_a_linked_summary(path):
    written = report.write_report(path)
    pngs, summary = written[:-1], written[-1]
    assert len(pngs) == 9 and all(f.parent == path / "results" / "plots" for f in pngs)
    for png in pngs:
        width, height = png_size(png)
        assert width > 300 and height > 200 and png.stat().st_size > 10_000
    text = summary.read_text()
    for png in pngs:
        assert f"](plots/{png.name})" in text
    for table in ("epochs.parquet", "trials.parquet", "best.json"):
        assert f"]({table})" in text and (summary.parent / table).is_file()
    assert "scope `last`" in text and "a0000001" in text


def test_exported_config_reruns_the_trial_exactly(path, tmp_path):
    # The Tune trainable runs `plan.trial(params)`; the export must train identically.
    out = results.export(path, tmp_path / "best.yaml")
    searched = run_trial(plans()[SYM].trial(fake("a0000001").params)).history
    rerun = run_trial(load_exported(out, SYM)).history
    drop = ("epoch_seconds",)  # wall time is the only thing allowed to differ
    assert [{k: v for k, v in h.items() if k not in drop} for h in rerun] == [
        {k: v for k, v in h.items() if k not in drop} for h in searched
    ]
