"""What evaluating the test set costs an epoch, which `test_eval: milestones` skips where no
result reports it (`metrics.evaluates_test_set`).

One trial of the quick spec's config (embedded MNIST, 20k subset, JAL-CE, 40% symmetric noise,
one torch thread: a trial's share), two epochs, run two ways interleaved: evaluating the test set
(10,000 images) at every epoch, and only at the last. Epoch 1's `epoch_seconds` (training,
validation and, in the first arm, the test set) of each arm; the ratio is the share of an epoch
that skipping the test set leaves. Short mode: digits (its 360 test images), to exercise the code.

    .venv/bin/python benchmarks/eval_cost.py --short   # digits, seconds
    .venv/bin/python benchmarks/eval_cost.py           # MNIST 20k, 3 repeats, ~1 min
"""

from __future__ import annotations

import _common


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], timing=False)
    args = p.parse_args()
    import torch

    from jal_search.config import TrialConfig
    from jal_search.train import run_trial

    torch.set_num_threads(1)
    quick = dict(dataset="mnist", train_subset=20000, noise_type="symmetric", noise_rate=0.4)
    base = TrialConfig(
        **(dict(dataset="digits") if args.short else quick),
        loss="jal_ce",
        epochs=2,
        threads=1,
        device="cpu",
    )
    repeats = args.repeats or (2 if args.short else 3)
    _common.header(
        "eval_cost", args, config=base.model_dump(exclude_defaults=True), repeats=repeats
    )

    def first_epoch(test_epochs: tuple[int, ...] | None) -> float:
        history = run_trial(base.model_copy(update={"test_epochs": test_epochs})).history
        assert ("test_acc" in history[0]) == (test_epochs is None)
        return history[0]["epoch_seconds"]

    times = _common.interleaved(
        {"every epoch": lambda: first_epoch(None), "last only": lambda: first_epoch(())},
        repeats,
    )
    for name, values in times.items():
        print(f"epoch 1, test set {name}: {_common.spread(values)} s")
    share = _common.median(times["last only"]) / _common.median(times["every epoch"])
    _common.ratio(
        "epoch without the test set / with it", share, "<=", 0.9 if not args.short else 1.5
    )


if __name__ == "__main__":
    main()
