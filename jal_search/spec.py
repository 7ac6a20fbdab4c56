"""Search specs: the YAML schema, its validation, and the resolved plan of one search.

A spec names a dataset, a loss, the noise settings to tune for, the parameter space, a budget and
the searcher/scheduler. Unknown keys are errors. `plan()` turns a spec into one `SettingPlan` per
noise setting: the space actually searched (with AMSE's lower bound on `a` applied), the paper's
shipped config to evaluate first, and the base trial config every trial starts from.

AMSE's bound (SPEC §2.4): for the losses built on AMSE (`nceandamse`, `nflandamse`, `amse`) and a
noise setting with a closed-form bound (clean, symmetric, asymmetric — on datasets whose own
labels are clean), `a` below `amse_a_min` is
removed from the space (`amse_bound: exclude`, the default) or kept and flagged in the results
(`amse_bound: flag`). Other noise types have no closed-form bound and are searched as given.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from jal_search.config import (
    DEFAULT_SEED,
    Number,
    NumberOrName,
    PathText,
    Seed,
    TrialConfig,
    one_line,
    read_document,
    trial_config,
)
from jal_search.errors import UserError
from jal_search.noise import NoiseSetting, parse_noise_setting
from jal_search.profiles import get_profile, shipped_loss_params

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"  # shipped in the wheel
AMSE_LOSSES = ("nceandamse", "nflandamse", "amse")
CLOSED_FORM_BOUND = ("clean", "symmetric", "asymmetric")
# Datasets whose shipped labels already carry unknown real-world noise: no closed-form bound.
REAL_NOISE_DATASETS = ("webvision", "clothing1m", "imagefolder")
TRAINING_KNOBS = ("lr", "l1", "l2", "batch_size")  # TrialConfig fields a space may search
MAX_TRIALS = 100_000  # per setting; a grid and `pack` list every config up front


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Param(_Strict):
    """One searched parameter: exactly one of loguniform / uniform / choice / fixed."""

    loguniform: tuple[Number, Number] | None = None
    uniform: tuple[Number, Number] | None = None
    choice: list[Number] | None = Field(None, min_length=1)
    fixed: Number | None = None

    @model_validator(mode="before")
    @classmethod
    def _scalar_is_fixed(cls, value: Any) -> Any:
        return {"fixed": value} if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> Param:
        given = [
            k for k in ("loguniform", "uniform", "choice", "fixed") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, choice, fixed")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs [low, high] with low < high")
            if bounds is not None and not math.isfinite(bounds[1] - bounds[0]):
                raise ValueError(f"{kind}: [low, high] spans more than a float holds; narrow it")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive low bound")
        return self

    @property
    def low(self) -> float:
        bounds = self.loguniform or self.uniform
        if bounds is not None:
            return bounds[0]
        return min(self.choice) if self.choice is not None else float(self.fixed)  # type: ignore[arg-type]

    @property
    def high(self) -> float:
        bounds = self.loguniform or self.uniform
        if bounds is not None:
            return bounds[1]
        return max(self.choice) if self.choice is not None else float(self.fixed)  # type: ignore[arg-type]

    def contains(self, value: float) -> bool:
        if self.choice is not None:
            return value in self.choice
        return self.low <= value <= self.high

    def at_least(self, floor: float) -> Param | None:
        """This parameter restricted to values ≥ floor; None when nothing is left."""
        is_range = self.choice is None and self.fixed is None
        if self.high < floor or (is_range and self.high == floor):  # a range needs low < high
            return None
        if self.choice is not None:
            return Param(choice=[v for v in self.choice if v >= floor])
        if self.fixed is not None:
            return self
        kind = "loguniform" if self.loguniform is not None else "uniform"
        return Param(**{kind: (max(self.low, floor), self.high)})


class Budget(_Strict):
    trials: StrictInt = Field(
        ge=1, le=MAX_TRIALS, description="trials per noise setting (grid: the grid's size)"
    )
    epochs: StrictInt = Field(ge=1, description="maximum epochs per trial")


class Scheduler(_Strict):
    # successive_halving: Optuna's rule (SuccessiveHalvingPruner: a trial goes on past a rung if
    # it is among the best ⌊n/rf⌋ of the n recorded there, itself included, or the best while
    # n < rf); paused_halving: the best max(1, ⌊n/rf^(k+1)⌋) of a setting's n trials go on past
    # rung k, judged on the whole rung: a trial waits there, paused, until later arrivals decide
    # it; the paper's configs run their budget (studies.PausedHalving); asha: Ray's ASHA (if it
    # clears the (1 − 1/rf) percentile of the values recorded there before it); none: every
    # trial runs its budget. Replayed on grid curves of three noise settings (benchmarks/
    # asha_efficiency.py --compare; benchmarks/README.md), Optuna's rule trains 16–19% fewer
    # epochs than ASHA for the same best, and paused halving 26–34% fewer than Optuna's rule —
    # with the paper's config in the search; without one it finds a best 0.1–0.3 points lower,
    # so Optuna's rule stays the default.
    type: Literal["asha", "successive_halving", "paused_halving", "none"] = "successive_halving"
    grace_period: StrictInt = Field(1, ge=1)  # epochs every trial runs before it can be stopped
    # rf 6: rungs at epochs 1, 6, 36…; the cheapest schedule that kept the best config in
    # benchmarks/asha_efficiency.py (MNIST, 48 configs × 20 epochs)
    reduction_factor: Number = Field(6.0, gt=1)

    def rungs(self, epochs: int) -> list[int]:
        """The epochs at which a trial may be stopped: grace·rf^k below the budget (a trial is
        judged at the first epoch at or past a fractional one)."""
        if self.type == "none":
            return []
        count = int(math.log(epochs / self.grace_period) / math.log(self.reduction_factor) + 1)
        return [
            math.ceil(self.grace_period * self.reduction_factor**k)
            for k in range(count)
            if self.grace_period * self.reduction_factor**k < epochs
        ]


class Searcher(_Strict):
    type: Literal["optuna", "random", "grid"] = "optuna"
    seed: Seed = 0


class Resources(_Strict):
    cpus_per_trial: Number = Field(1.0, gt=0)
    gpus_per_trial: Number = Field(0.0, ge=0)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        share = 1 / value if value else 0.0  # inf for a subnormal value: refused below
        if 0 < value < 1 and not (share < 1e6 and math.isclose(share, round(share))):
            raise ValueError("a GPU fraction must be 1/k (0.5, 0.25, ...) so trials pack a GPU")
        if value >= 1 and value != int(value):
            raise ValueError("more than one GPU per trial must be a whole number")
        return value


class SearchSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)  # a folder name
    description: str = ""
    dataset: str
    data_root: PathText | None = None
    train_subset: StrictInt | None = Field(None, gt=0)
    loss: str
    noise: dict[str, list[NumberOrName]] = Field(min_length=1)
    noise_files: dict[str, PathText] = Field(default_factory=dict)  # setting name → label file
    space: dict[str, Param] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)  # TrialConfig overrides (lr, model, …)
    val_fraction: Number = Field(0.1, gt=0, lt=1)
    val_labels: Literal["noisy", "clean"] = "noisy"
    budget: Budget
    scheduler: Scheduler = Scheduler()
    searcher: Searcher = Searcher()
    amse_bound: Literal["exclude", "flag"] = "exclude"
    paper_configs_first: StrictBool = True
    seed: Seed = DEFAULT_SEED
    resources: Resources = Resources()
    max_concurrent_trials: StrictInt | None = Field(None, ge=1)
    max_failures: StrictInt = Field(2, ge=0)
    # Trials trained side by side, up to `pack` per pack worker (a process holding `resources`:
    # jal_search.packed, tune_packs); each is still its own trial to the searcher and scheduler.
    pack: StrictInt = Field(1, ge=1, le=128)
    # When a trial evaluates the test set, which no decision uses: `milestones` — at the epochs
    # it may end on (the scheduler's rungs and the budget's last epoch); `every_epoch` — the
    # whole curve (as `results --scope best-epoch` wants it).
    test_eval: Literal["milestones", "every_epoch"] = "milestones"
    # Who runs the trials: `ray` — Ray Tune, a process per trial, on this machine or a cluster
    # (--address); `local` — threads of the driver on this machine's CPUs, no Ray (local_search:
    # for short searches, where Ray's ~10 s of fixed costs weigh; a crash of the process ends
    # the search, which `resume` continues).
    executor: Literal["ray", "local"] = "ray"
    storage_path: PathText = "jal_results"
    storage_shared: StrictBool = False  # a local storage_path that every node of the cluster sees
    tracking_uri: str | None = None

    @field_validator("dataset", "loss")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "credentials in the URI would be stored with the experiment; give the URI "
                "without them and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            )
        return value

    @model_validator(mode="after")
    def _scheduler_fits_budget(self) -> SearchSpec:
        if self.scheduler.type != "none" and self.scheduler.grace_period > self.budget.epochs:
            raise ValueError(
                f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds budget.epochs "
                f"({self.budget.epochs}); lower it or raise the budget"
            )
        return self

    @model_validator(mode="after")
    def _packs_share_a_batch_size(self) -> SearchSpec:
        if self.pack > 1 and "batch_size" in self.space:
            raise ValueError(
                "pack: the configs of a pack share one batch size; fix batch_size (training:) "
                "or set pack: 1"
            )
        return self

    @model_validator(mode="after")
    def _local_runs_what_it_can(self) -> SearchSpec:
        if self.executor != "local":
            return self
        if self.pack > 1:
            raise ValueError("pack: packs run in Ray's pack workers; set executor: ray or pack: 1")
        if self.resources.gpus_per_trial:
            raise ValueError(
                "resources.gpus_per_trial: executor local trains on this machine's CPUs; set "
                "executor: ray for GPUs"
            )
        if self.scheduler.type == "asha":
            raise ValueError(
                "scheduler.type: asha is Ray's scheduler; with executor local use "
                "paused_halving, successive_halving (Optuna's rule) or none, or set executor: ray"
            )
        return self


class SettingPlan(_Strict):
    """What one noise setting searches (its own searcher and scheduler in the Tune experiment)."""

    setting: NoiseSetting
    space: dict[str, Param]
    a_min: float | None  # AMSE's bound for this setting, when the loss uses AMSE and one is known
    points_to_evaluate: list[dict[str, float]]
    base: TrialConfig  # every trial's config before the sampled parameters are applied

    @property
    def name(self) -> str:
        return self.setting.name

    def trial(self, sampled: dict[str, float]) -> TrialConfig:
        """The trial config for one sampled point of the space."""
        knobs = {k: v for k, v in sampled.items() if k in TRAINING_KNOBS}
        if "batch_size" in knobs:
            knobs["batch_size"] = int(knobs["batch_size"])
        params = {k: v for k, v in sampled.items() if k not in TRAINING_KNOBS}
        return self.base.model_copy(
            update={"loss_params": {**self.base.loss_params, **params}, **knobs}
        )


def load_spec(source: str | Path) -> SearchSpec:
    """Read a spec from a YAML path or a shipped spec's name (`quick`, `smoke`, …)."""
    path = resolve_spec_path(source)
    spec = parse_spec(read_raw_spec(path), where=path.name)

    # Relative data paths are relative to the spec file, and absolute from here on: trials run
    # in other processes and on other nodes.
    def absolute(p: str) -> str:
        return str((path.parent / os.path.expanduser(p)).resolve())

    return spec.model_copy(
        update={
            "data_root": None if spec.data_root is None else absolute(spec.data_root),
            "noise_files": {k: absolute(v) for k, v in spec.noise_files.items()},
        }
    )


REPLACED_WHOLE = ("space", "noise", "noise_files")  # a child's value replaces the base's


def read_raw_spec(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec file's mapping with its `extends:` chain merged in.

    `extends: NAME` (a shipped spec or a path relative to this file) starts from that spec;
    mappings merge key by key, except `space`, `noise` and `noise_files`, which a child replaces
    whole (a child's search space is never a mix of two spaces by accident).
    """
    if path in seen:
        raise UserError(f"{path}: `extends` forms a cycle ({' -> '.join(p.name for p in seen)})")
    raw = read_document(path, "spec")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a spec must be a YAML mapping of keys (name, dataset, loss, …)")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a spec's name or path, got {parent!r}")
    relative = path.parent / parent
    base_path = relative if _is_file(relative) else resolve_spec_path(parent)
    return _merge(read_raw_spec(base_path.resolve(), (*seen, path)), raw)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if (
            isinstance(value, dict)
            and isinstance(base.get(key), dict)
            and key not in REPLACED_WHOLE
        ):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


def parse_spec(raw: dict[str, Any], where: str = "spec") -> SearchSpec:
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(one_line(err, where)) from None
    plan(spec)  # semantic checks: loss, parameters, noise settings, bounds
    return spec


def resolve_spec_path(source: str | Path) -> Path:
    path = Path(source)
    if _is_file(path):
        return path.resolve()
    shipped = SPACES_DIR / f"{source}.yaml"
    if _is_file(shipped):
        return shipped
    raise UserError(
        f"spec {str(source)!r}: no such file and no shipped spec of that name; "
        f"see `jal-search spaces` (shipped: {', '.join(shipped_specs())})"
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the OS, a NUL: no such file either
        return False


def shipped_specs() -> list[str]:
    """Runnable shipped specs; files starting with `_` are bases that others extend."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def noise_settings(spec: SearchSpec) -> list[NoiseSetting]:
    settings = []
    for noise_type, rates in spec.noise.items():
        if not rates:
            raise UserError(f"noise.{noise_type}: empty list; give at least one rate or remove it")
        for rate in rates:
            text = noise_type if noise_type == "clean" else f"{noise_type}:{rate}"
            settings.append(parse_noise_setting(text))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise UserError(f"noise: a setting appears twice ({names}); list each rate once")
    return settings


def plan(spec: SearchSpec) -> list[SettingPlan]:
    """One plan per noise setting; raises UserError for anything that cannot run."""
    from jal_search.data import IN_MEMORY_DATASETS
    from jal_search.losses import amse_a_min, canonical_loss_name, loss_parameters

    get_profile(spec.dataset)  # a dataset without a training profile cannot be searched
    if spec.pack > 1 and spec.dataset not in IN_MEMORY_DATASETS:
        raise UserError(
            f"pack: {spec.dataset} is read from files; packed trials need an in-memory dataset "
            f"({', '.join(IN_MEMORY_DATASETS)}): set pack: 1"
        )
    loss = canonical_loss_name(spec.loss)
    valid = loss_parameters(loss)
    for key in spec.space:
        if key not in valid and key not in TRAINING_KNOBS:
            raise UserError(
                f"space.{key}: loss {loss!r} has no parameter {key!r}; valid: "
                f"{', '.join([*valid, *TRAINING_KNOBS])}"
            )
    if spec.searcher.type == "grid":
        loose = [k for k, p in spec.space.items() if p.choice is None and p.fixed is None]
        if loose:
            raise UserError(
                f"space.{loose[0]}: a grid search needs `choice` or `fixed` values, not a range"
            )
        size = space_size(spec.space) or 1
        if size > MAX_TRIALS:
            raise UserError(
                f"space: the grid holds {size:,} configs, more than {MAX_TRIALS:,}; "
                "give fewer choices"
            )
    for key in ("epochs", "seed", "loss", "dataset", "noise_type", "noise_rate"):
        if key in spec.training:
            raise UserError(f"training.{key}: set this with the spec's own key, not under training")
    if "test_epochs" in spec.training:
        raise UserError("training.test_epochs: set the spec's test_eval (milestones|every_epoch)")

    base_fields = {
        "dataset": spec.dataset,
        "data_root": spec.data_root,
        "train_subset": spec.train_subset,
        "loss": loss,
        "val_fraction": spec.val_fraction,
        "val_labels": spec.val_labels,
        "seed": spec.seed,
        "threads": max(1, int(spec.resources.cpus_per_trial)),
        **spec.training,
        "epochs": spec.budget.epochs,
        "test_epochs": (
            spec.scheduler.rungs(spec.budget.epochs) if spec.test_eval == "milestones" else None
        ),
    }
    fixed = {k: p.fixed for k, p in spec.space.items() if p.fixed is not None}
    shipped = {**valid, **shipped_loss_params(spec.dataset, loss)}
    known = {s.name for s in noise_settings(spec)}
    for name in spec.noise_files:
        if name not in known:
            raise UserError(
                f"noise_files.{name}: not a noise setting of this spec ({sorted(known)})"
            )

    plans = []
    for setting in noise_settings(spec):
        num_classes = _num_classes(spec.dataset)
        a_min = None
        space = {k: p for k, p in spec.space.items() if p.fixed is None}
        known_noise = spec.dataset not in REAL_NOISE_DATASETS
        if loss in AMSE_LOSSES and setting.type in CLOSED_FORM_BOUND and known_noise:
            rate = 0.0 if setting.type == "clean" else float(setting.rate)
            a_min = amse_a_min(setting.type, rate, num_classes)
            if spec.amse_bound == "exclude":
                space = _exclude_below(space, fixed, a_min, setting.name, shipped)
        base = trial_config(
            {
                **base_fields,
                "noise_type": setting.type,
                "noise_rate": setting.rate,
                "noise_file": spec.noise_files.get(setting.name),
                "loss_params": fixed,
            },
            where="spec",
        )
        resolved = base.resolve()  # fails early on bad training overrides
        paper = {**shipped, **{k: getattr(resolved, k) for k in TRAINING_KNOBS}}
        points = []
        if spec.paper_configs_first and space:
            point = {k: paper.get(k) for k in space}
            if all(v is not None and space[k].contains(v) for k, v in point.items()):
                points.append(point)
        plans.append(
            SettingPlan(
                setting=setting, space=space, a_min=a_min, points_to_evaluate=points, base=base
            )
        )
    return plans


def _exclude_below(
    space: dict[str, Param], fixed: dict[str, float], a_min: float, setting: str, shipped: dict
) -> dict[str, Param]:
    """Remove `a` < a_min from the space; refuse when nothing valid is left."""
    if math.isinf(a_min):
        raise UserError(
            f"noise {setting}: no value of AMSE's `a` is noise-tolerant here (clean labels are not "
            "the majority); drop the setting or set amse_bound: flag"
        )
    a = fixed.get("a", shipped.get("a"))
    if "a" not in space:
        if a is not None and a < a_min:
            raise UserError(
                f"space.a: fixed a={a:g} is below AMSE's bound {a_min:.3g} for {setting}; "
                "raise it or set amse_bound: flag"
            )
        return space
    narrowed = space["a"].at_least(a_min)
    if narrowed is None:
        raise UserError(
            f"space.a: every value is below AMSE's bound {a_min:.3g} for {setting}; "
            "raise the range or set amse_bound: flag"
        )
    return {**space, "a": narrowed}


def _num_classes(dataset: str) -> int:
    known = {"mnist": 10, "fashion_mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100,
             "webvision": 50, "clothing1m": 14}  # fmt: skip
    if dataset not in known:
        raise UserError(
            f"dataset: {dataset!r} cannot be searched by name alone; valid: {', '.join(known)}"
        )
    return known[dataset]


def space_size(space: dict[str, Param]) -> int | None:
    """How many distinct configs `space` holds; None when a parameter is a range."""
    if any(p.choice is None and p.fixed is None for p in space.values()):
        return None
    return math.prod(len(p.choice or [p.fixed]) for p in space.values())


def trials_per_setting(spec: SearchSpec, space: dict[str, Param] | None = None) -> int:
    """Trials a setting runs: a grid's size; otherwise the budget, and for Optuna no more than
    `space` (the setting's own, narrowed by AMSE's bound; default the spec's) holds: it never
    trains a config twice."""
    size = space_size(spec.space if space is None else space)
    if spec.searcher.type == "grid":
        return size or 1
    if spec.searcher.type == "optuna" and size is not None:
        return min(spec.budget.trials, size)
    return spec.budget.trials


def describe(spec: SearchSpec) -> str:
    """The resolved search, for `jal-search validate`: settings × trials × epochs and the bounds."""
    plans = plan(spec)
    trials = trials_per_setting(spec)
    lines = [
        f"search {spec.name}: {spec.dataset} / {spec.loss} / searcher {spec.searcher.type} "
        f"(seed {spec.searcher.seed}) / scheduler {spec.scheduler.type}"
        + (
            f" (grace {spec.scheduler.grace_period}, reduction {spec.scheduler.reduction_factor:g})"
            if spec.scheduler.type != "none"
            else ""
        ),
        f"{len(plans)} noise settings × {trials} trials × ≤{spec.budget.epochs} epochs "
        f"= worst case {len(plans) * trials * spec.budget.epochs} trial-epochs"
        + (f"; trained up to {spec.pack} at a time per pack worker" if spec.pack > 1 else ""),
        f"selection: val_acc on {spec.val_labels} validation labels "
        f"({spec.val_fraction:.0%} of the training set); test accuracy is reported only",
    ]
    for p in plans:
        bound = "" if p.a_min is None else f"  a_min={p.a_min:.3g} ({spec.amse_bound})"
        space = ", ".join(f"{k}={_show(v)}" for k, v in p.space.items()) or "(fixed)"
        first = f"  first: {p.points_to_evaluate[0]}" if p.points_to_evaluate else ""
        lines.append(f"  {p.name:16} {space}{bound}{first}")
    return "\n".join(lines)


def _show(p: Param) -> str:
    for kind in ("loguniform", "uniform"):
        bounds = getattr(p, kind)
        if bounds is not None:
            return f"{kind}[{bounds[0]:.3g}, {bounds[1]:.3g}]"
    return f"choice{p.choice}" if p.choice is not None else f"{p.fixed:g}"


def fixed_configs(spec: SearchSpec, p: SettingPlan) -> list[dict[str, float]]:
    """A grid or random search's configs, chosen up front: every point of the grid, or the
    paper's point followed by seeded samples of the space, `budget.trials` in all."""
    if spec.searcher.type == "grid":
        return grid_points(p.space)
    rng = random.Random(f"{spec.searcher.seed}/{p.name}")
    points = p.points_to_evaluate[: spec.budget.trials]
    while len(points) < spec.budget.trials:
        points.append({k: _sample(v, rng) for k, v in p.space.items()})
    return points


def with_trials(spec: SearchSpec, trials: int) -> SearchSpec:
    """`spec` with a budget of `trials` per setting (what `jal-search extend` raises it to)."""
    return spec.model_copy(update={"budget": spec.budget.model_copy(update={"trials": trials})})


def _sample(p: Param, rng: random.Random) -> float:
    if p.loguniform is not None:
        return math.exp(rng.uniform(math.log(p.loguniform[0]), math.log(p.loguniform[1])))
    if p.uniform is not None:
        return rng.uniform(*p.uniform)
    return rng.choice(p.choice)  # type: ignore[arg-type]


def grid_points(space: dict[str, Param]) -> list[dict[str, float]]:
    keys = list(space)
    values = [space[k].choice or [space[k].fixed] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
