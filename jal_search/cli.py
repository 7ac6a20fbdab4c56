"""The `jal-search` command.

Heavy imports (torch, Ray, MLflow) happen inside the verbs that need them, so `--help`, `spaces`
and `validate` answer quickly. User mistakes print one line and exit 2; nothing else does.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from jal_search.errors import UserError

EXIT_USER_ERROR = 2
DOWNLOAD_HELP = "fetch a torchvision dataset into --data-root first (needs internet)"
MAX_MESSAGE = 1000  # characters of an error line; a message may quote a whole user value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like UserError
        raise UserError(f"{self.prog}: {message} (see --help)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if any("\0" in arg for arg in argv):  # no shell passes one; the OS refuses it in paths
            raise UserError("an argument holds a NUL character; remove it")
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"jal-search: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        hint = " (an interrupted search continues with `jal-search resume EXPERIMENT`)"
        resumable = getattr(args, "verb", None) in ("run", "resume", "extend")
        print(f"jal-search: interrupted{hint if resumable else ''}", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: `main`, the exit handlers (Ray's shutdown among them), then out
    without Python tearing its modules down one by one, which takes a second or more once torch,
    Ray and MLflow are loaded, after the last line was printed and every file closed."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more reaches it
            pass
    os._exit(code)


def _one_line(text: str) -> str:
    """`text` with control characters escaped (one line, whatever a user value held), cut short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_MESSAGE else f"{text[: MAX_MESSAGE - 1]}…"


def _path(text: str) -> str:
    """An argparse type: a path the OS can take (no NUL, no over-long name, no unknown ~user)."""
    from jal_search.config import check_path_text

    try:
        return check_path_text(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jal-search",
        description="Tune Joint Asymmetric Loss (JAL) and its baselines on noisy labels.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    _add_run(verbs)
    _add_resume(verbs)
    _add_extend(verbs)
    _add_spaces(verbs)
    _add_validate(verbs)
    _add_results(verbs)
    _add_export(verbs)
    _add_evaluate(verbs)
    _add_compare(verbs)
    _add_report(verbs)
    _add_sync(verbs)
    _add_train(verbs)
    _add_list(verbs)
    return parser


# ------------------------------------------------------------------------------------ run, resume
def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join: auto, ray://host:10001, host:6379")
    p.add_argument("--num-cpus", type=int, help="CPUs of the private local Ray (default: all)")


def _add_tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: sqlite:///<storage_path>/mlflow.db; clusters: http://…)",
    )


def _add_run(verbs: Any) -> None:
    p = verbs.add_parser(
        "run",
        help="run a search: every noise setting, each with its own searcher and scheduler",
        description="Run a search spec (a YAML file, or a shipped spec name: see `spaces`).",
    )
    p.add_argument(
        "spec", nargs="?", default="quick", type=_path, help="spec file or name (default: quick)"
    )
    p.add_argument("--name", help="experiment name (default: the spec's name)")
    p.add_argument(
        "--storage-path", type=_path, help="where experiments live (default: the spec's)"
    )
    p.add_argument("--data-root", type=_path, help="dataset folder (default: the spec's data_root)")
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    _add_cluster_args(p)
    _add_tracking_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jal_search import search

    search.run(
        args.spec,
        name=args.name,
        storage_path=args.storage_path,
        data_root=args.data_root,
        download=args.download,
        **_session(args),
    )
    return 0


def _session(args: argparse.Namespace) -> dict[str, Any]:
    """Where a search runs and is tracked: what run, resume and extend take alike."""
    return {"address": args.address, "num_cpus": args.num_cpus, "tracking_uri": args.tracking_uri}


def _add_resume(verbs: Any) -> None:
    p = verbs.add_parser("resume", help="finish an interrupted search")
    _add_experiment_arg(p)
    _add_cluster_args(p)
    _add_tracking_arg(p)
    p.set_defaults(func=_resume)


def _resume(args: argparse.Namespace) -> int:
    from jal_search import search

    search.resume(args.experiment, **_session(args))
    return 0


def _add_extend(verbs: Any) -> None:
    p = verbs.add_parser(
        "extend",
        help="run more trials in a search, its searchers warm with every trial so far",
        description="Run N more trials per noise setting in the same experiment (or in the "
        "settings named); each setting's Optuna study carries on where it stopped.",
    )
    _add_experiment_arg(p)
    p.add_argument("--trials", type=int, required=True, help="trials to add per setting")
    p.add_argument(
        "--setting", action="append", help="extend only this setting (repeatable; default: all)"
    )
    _add_cluster_args(p)
    _add_tracking_arg(p)
    p.set_defaults(func=_extend)


def _extend(args: argparse.Namespace) -> int:
    from jal_search import search

    search.extend(args.experiment, args.trials, settings=args.setting, **_session(args))
    return 0


def _add_experiment_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiment", type=_path, help="experiment folder (or its name under ./jal_results)"
    )


def _add_scope_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scope",
        choices=("last", "best-epoch", "last-k-mean"),
        default="last",
        help="which epochs' val_acc select the best trial (default: last)",
    )
    p.add_argument("--last-k", type=int, default=3, help="k of last-k-mean (default 3)")


# ---------------------------------------------------------------- results, export, evaluate, …
def _add_results(verbs: Any) -> None:
    p = verbs.add_parser(
        "results", help="write epochs/trials parquet tables; print the top configs"
    )
    _add_experiment_arg(p)
    _add_scope_args(p)
    p.add_argument("--top", type=int, default=5, help="configs shown per setting (default 5)")
    p.set_defaults(func=_results)


def _results(args: argparse.Namespace) -> int:
    from jal_search import results

    written = results.write_tables(args.experiment, scope=args.scope, last_k=args.last_k)
    print(results.top_table(args.experiment, k=args.top, scope=args.scope, last_k=args.last_k))
    for path in written.values():
        print(f"wrote {path}")
    return 0


def _add_export(verbs: Any) -> None:
    p = verbs.add_parser("export", help="write the best config per noise setting (YAML/JSON)")
    _add_experiment_arg(p)
    p.add_argument("--out", required=True, type=_path, help="best.yaml or best.json")
    _add_scope_args(p)
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from jal_search import results

    path = results.export(args.experiment, args.out, scope=args.scope, last_k=args.last_k)
    print(f"wrote {path}; rerun one with: jal-search train --config {path} --setting NAME")
    return 0


def _add_evaluate(verbs: Any) -> None:
    p = verbs.add_parser(
        "evaluate", help="retrain each best config over seeds (Ray tasks); mean ± std table"
    )
    _add_experiment_arg(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--scope", choices=("last", "best-epoch", "last-k-mean"), default="last")
    p.add_argument(
        "--pack",
        type=int,
        help="trainings per Ray task, trained side by side in one process (in-memory datasets; "
        "default: as many as keep every CPU busy, at most 4; 1: one per task)",
    )
    _add_cluster_args(p)
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from jal_search import search

    table = search.evaluate(
        args.experiment,
        seeds=args.seeds,
        scope=args.scope,
        address=args.address,
        num_cpus=args.num_cpus,
        pack=args.pack,
    )
    print(table)
    _publish(args.experiment)
    return 0


def _add_compare(verbs: Any) -> None:
    p = verbs.add_parser("compare", help="one table across searches: rows = losses")
    p.add_argument("experiments", nargs="+", type=_path, help="experiment folders or names")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from jal_search import results

    print(results.compare(args.experiments))
    return 0


def _add_report(verbs: Any) -> None:
    p = verbs.add_parser("report", help="PNG plots and a markdown summary of a search")
    _add_experiment_arg(p)
    _add_scope_args(p)
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from jal_search import report

    for path in report.write_report(args.experiment, scope=args.scope, last_k=args.last_k):
        print(f"wrote {path}")
    _publish(args.experiment)
    return 0


def _publish(experiment: str) -> None:
    """Log the results folder to MLflow's parent runs; an outage only postpones it."""
    from jal_search import search

    try:
        search.sync(experiment)
        print("logged results to MLflow")
    except UserError as err:
        print(f"warning: results not logged to MLflow ({err})", file=sys.stderr)


def _add_sync(verbs: Any) -> None:
    p = verbs.add_parser("sync", help="bring MLflow up to date with an experiment (after outages)")
    _add_experiment_arg(p)
    _add_tracking_arg(p)
    p.set_defaults(func=_sync)


def _sync(args: argparse.Namespace) -> int:
    from jal_search import search

    print(search.sync(args.experiment, tracking_uri=args.tracking_uri))
    return 0


# ------------------------------------------------------------------------------- spaces, validate
def _add_spaces(verbs: Any) -> None:
    p = verbs.add_parser("spaces", help="list the shipped search specs")
    p.set_defaults(func=_spaces)


def _spaces(args: argparse.Namespace) -> int:
    from jal_search.spec import load_spec, shipped_specs

    for name in shipped_specs():
        spec = load_spec(name)
        print(f"{name:22} {spec.dataset:10} {spec.loss:12} {spec.description}")
    return 0


def _add_validate(verbs: Any) -> None:
    p = verbs.add_parser("validate", help="check a spec and print the resolved search")
    p.add_argument("spec", type=_path, help="spec file or shipped spec name")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from jal_search.spec import describe, load_spec

    print(describe(load_spec(args.spec)))
    return 0


# ---------------------------------------------------------------------------------------- train
def _add_train(verbs: Any) -> None:
    from jal_search.config import DEFAULT_SEED

    p = verbs.add_parser(
        "train",
        help="run one training (no Ray) and print per-epoch metrics",
        description="Train one configuration without Ray and print its metrics every epoch. "
        "Example: jal-search train --dataset mnist --noise symmetric:0.6 --loss jal_ce "
        "--alpha 1 --beta 1 --a 30 --epochs 10",
    )
    p.add_argument("--dataset", default="mnist", help="dataset name (default: mnist, embedded)")
    p.add_argument(
        "--data-root", type=_path, help="folder holding the dataset (see README: Datasets)"
    )
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--subset", type=int, help="train on this many training images (seeded subset)")
    p.add_argument("--noise", default="clean", help="TYPE:RATE, e.g. symmetric:0.6, human:worst")
    p.add_argument("--noise-file", type=_path, help="label file for dependent or human noise")
    p.add_argument("--loss", default="jal_ce", help="loss name (jal-search list losses)")
    for name in ("alpha", "beta", "a", "q", "gamma"):
        p.add_argument(f"--{name}", type=float, help=f"loss parameter {name}")
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="other loss parameter"
    )
    p.add_argument("--epochs", type=int, help="epochs (default: the dataset profile's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the profile's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the profile's)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out part (default 0.1)")
    p.add_argument("--val-labels", choices=("noisy", "clean"), default="noisy")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--seeds", type=int, default=1, help="repeat over seeds seed..seed+K-1")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16 autocast (auto: the profile's choice where the device has fast bf16)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per epoch")
    p.add_argument(
        "--config",
        type=_path,
        help="an exported config file (jal-search export); other flags ignored",
    )
    p.add_argument("--setting", help="the noise setting to take from --config")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise UserError("train: --seeds must be at least 1")
    base = _exported(args) if args.config else _from_flags(args)
    if args.download:
        from jal_search.data import load_dataset

        load_dataset(base.dataset, base.data_root, download=True)
    from jal_search.train import run_trial

    finals = []
    for seed in range(base.seed, base.seed + args.seeds):
        cfg = (
            base.model_copy(update={"seed": seed, "noise_seed": seed})
            if seed != base.seed
            else base
        )
        if not args.json:
            print(f"# {_describe(cfg)}", flush=True)
        result = run_trial(cfg, report=_print_epoch(args.json, seed))
        finals.append(result.history[-1]["test_acc"] if result.history else float("nan"))
        if result.status != "completed":
            print(f"# seed {seed}: {result.status}", file=sys.stderr)
    if len(finals) > 1 and not args.json:
        import statistics

        print(
            f"# final test_acc over {len(finals)} seeds: "
            f"{100 * statistics.mean(finals):.2f} ± {100 * statistics.stdev(finals):.2f}"
        )
    return 0


def _exported(args: argparse.Namespace) -> Any:
    from jal_search.config import load_exported

    return load_exported(args.config, args.setting)


def _from_flags(args: argparse.Namespace) -> Any:
    from jal_search.config import trial_config
    from jal_search.noise import parse_noise_setting

    noise = parse_noise_setting(args.noise)
    params = {k: getattr(args, k) for k in ("alpha", "beta", "a", "q", "gamma")}
    params = {k: v for k, v in params.items() if v is not None} | _key_values(args.param)
    return trial_config(
        {
            "dataset": args.dataset,
            "data_root": args.data_root,
            "train_subset": args.subset,
            "noise_type": noise.type,
            "noise_rate": noise.rate,
            "noise_file": args.noise_file,
            "loss": args.loss,
            "loss_params": params,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "val_fraction": args.val_fraction,
            "val_labels": args.val_labels,
            "seed": args.seed,
            "device": args.device,
            "threads": args.threads,
            "precision": args.precision,
        },
        where="train",
    ).resolve()


def _describe(cfg: Any) -> str:
    params = ", ".join(f"{k}={v:g}" for k, v in cfg.loss_params.items())
    return (
        f"{cfg.dataset} {cfg.noise_name} {cfg.loss}({params}) model={cfg.model} "
        f"epochs={cfg.epochs} lr={cfg.lr:g} l1={cfg.l1:g} l2={cfg.l2:g} seed={cfg.seed}"
    )


def _print_epoch(as_json: bool, seed: int) -> Any:
    columns = ("epoch", "train_loss", "noisy_fit", "memorized", "val_acc", "test_acc")
    if not as_json:
        print("  ".join(f"{c:>10}" for c in columns))

    def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps({"seed": seed, **metrics}), flush=True)
            return
        print("  ".join(f"{metrics[c]:>10.4f}" for c in columns), flush=True)

    return report


def _key_values(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UserError(f"--param: expected KEY=NUMBER, got {item!r}")
    return out


# ----------------------------------------------------------------------------------------- list
def _add_list(verbs: Any) -> None:
    p = verbs.add_parser("list", help="list losses, datasets, models or noise types")
    p.add_argument("what", choices=("losses", "datasets", "models", "noise"))
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    if args.what == "losses":
        from jal_search.losses import loss_names, loss_parameters

        for name in loss_names():
            params = ", ".join(f"{k}={v:g}" for k, v in loss_parameters(name).items())
            print(f"{name:14} {params}")
    elif args.what == "datasets":
        from jal_search.profiles import PROFILES

        for p in PROFILES.values():
            print(f"{p.dataset:14} model={p.model} epochs={p.epochs} lr={p.lr:g}")
    elif args.what == "models":
        from jal_search.models import model_names

        print("\n".join(model_names()))
    else:
        from jal_search.noise import NOISE_TYPES

        print("\n".join(NOISE_TYPES))
    return 0


if __name__ == "__main__":
    entry()
